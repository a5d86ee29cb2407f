"""`compress` orchestration: load, validate, calibrate, allocate, prune (or LoSA), verify, evaluate, save.

Everything that can be wrong with the user's request is checked before the first expensive step, and the output
is written inside `atomic_dir`, so a failed or interrupted run leaves nothing that looks like a result.
"""

from __future__ import annotations

import math
import resource
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from .console import err
from .errors import UserError
from .model_parts import (block_param_counts, find_blocks, block_prefix, prunable_linears,
                          require_linear_blocks)
from .recipe import ADAPTER_METHODS, CompressRecipe, PruneSpec, pattern_parts


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _block_weights(model: Any, ignore: Sequence[str]) -> list[float] | None:
    """Per-block prunable parameter counts when blocks differ in size (None: equal blocks, plain mean)."""
    counts = block_param_counts(model, ignore)
    if any(c == 0 for c in counts):
        raise UserError("--ignore leaves a decoder block with no linear layer to prune; narrow the patterns")
    return None if len(set(counts)) == 1 else [float(c) for c in counts]


def check_model_against_recipe(model: Any, recipe: CompressRecipe) -> None:
    """Checks that need the model's shapes: something to prune, N:M divides every pruned layer, ATP beta range."""
    require_linear_blocks(model)
    lins = prunable_linears(model, recipe.ignore)
    if not lins:
        raise UserError("no linear layer left to prune: --ignore excludes all of them")
    kind, n, m = pattern_parts(recipe.pattern)
    if m:
        for name, (_, lin) in lins.items():
            if lin.in_features % m:
                raise UserError(
                    f"pattern {recipe.pattern}: layer {name} has {lin.in_features} inputs, not a multiple of {m}; "
                    f"exclude it with --ignore '{name}' or choose another M"
                )
    if recipe.allocation == "atp" and isinstance(recipe.atp_beta, float):
        from .allocation import atp_beta_range, atp_rates

        L = len(find_blocks(model)[1])
        lo, hi = atp_beta_range(L, recipe.target_sparsity)
        if not 0 < recipe.atp_beta <= hi:
            raise UserError(
                f"--atp-beta {recipe.atp_beta} is out of range for {L} blocks at sparsity {recipe.target_sparsity:g}: "
                f"use 0 < beta <= {hi:.6g} (or 'auto')"
            )
        atp_rates(L, recipe.target_sparsity, recipe.atp_beta)  # also rejects a 100%-sparse last block


# -------------------------------------------------------------------------------------------- allocation
def _one_buffer_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of `tensors` as views of one buffer per (device, dtype): one allocation, returned whole when freed."""
    groups: dict[tuple, list[str]] = {}
    for k, t in tensors.items():
        groups.setdefault((t.device, t.dtype), []).append(k)
    out: dict[str, torch.Tensor] = {}
    for (device, dtype), keys in groups.items():
        flat = torch.empty(sum(tensors[k].numel() for k in keys), dtype=dtype, device=device)
        offset = 0
        for k in keys:
            n = tensors[k].numel()
            out[k] = flat[offset : offset + n].view(tensors[k].shape).copy_(tensors[k])
            offset += n
    return out


def _tune_atp(
    model: Any, calib_ids: torch.Tensor, tune_ids: torch.Tensor, recipe: CompressRecipe, weights: list[float] | None,
    device: str, progress: bool,
) -> tuple[float, dict[str, Any]]:
    """Pick ATP's beta by perplexity on held-out tuning windows.

    Fast proxy: one dense pass collects Wanda statistics, then for each beta the masks are applied to the dense
    weights (no sequential re-calibration) and the tuning perplexity measured; the real prune follows with the
    chosen beta. The grid avoids the range's endpoints (beta = max would make the last block 100% sparse at S >= 0.5).
    """
    from .allocation import atp_beta_range, atp_rates
    from .evaluation.perplexity import perplexity
    from .pruning.masks import mixed_n_per_block, nm_mask, unstructured_row_mask
    from .pruning.scores import magnitude_scores, wanda_scores
    from .sequential import collect_wanda_stats

    t0 = time.perf_counter()
    name, blocks = find_blocks(model)
    L, S = len(blocks), recipe.target_sparsity
    _, hi = atp_beta_range(L, S)
    betas = [hi * k / (recipe.atp_grid + 1) for k in range(1, recipe.atp_grid + 1)]
    use_magnitude = recipe.method == "magnitude"
    sq = {} if use_magnitude else collect_wanda_stats(model, calib_ids, ignore=recipe.ignore, device=device,
                                                     offload=recipe.offload, progress=progress, desc="ATP: dense statistics")
    lins = prunable_linears(model, recipe.ignore)
    # The dense weights live in ONE buffer and every candidate is masked in place: per-layer clones (hundreds of
    # small allocations) stay in the allocator's heap after they are freed, which raised the peak RSS of the
    # prune that follows; one large buffer is unmapped as soon as it is released.
    dense = _one_buffer_copy({k: lin.weight.data for k, (_, lin) in lins.items()})

    def score(k: str) -> torch.Tensor:  # recomputed per beta: caching every layer's fp32 scores doubles peak memory
        return magnitude_scores(dense[k]) if use_magnitude else wanda_scores(dense[k], sq[k])

    kind, _, m = pattern_parts(recipe.pattern)
    rows: list[dict[str, Any]] = []
    try:
        for beta in [0.0] + betas:
            rates = atp_rates(L, S, beta, weights)
            ns = mixed_n_per_block(rates, m, S, weights) if kind == "mixed" else None
            for k, (bi, lin) in lins.items():
                mask = nm_mask(score(k), ns[bi], m) if ns is not None else unstructured_row_mask(score(k), rates[bi])
                lin.weight.data.copy_(dense[k]).mul_(mask.to(dense[k].dtype))
            if recipe.offload:
                model.to(device)
            ppl = perplexity(model, tune_ids.reshape(-1), tune_ids.shape[1], progress=False).perplexity
            if recipe.offload:
                model.to("cpu")
            rows.append({"beta": beta, "tune_ppl": ppl, "candidate": beta > 0})
            err.print(f"[dim]ATP tuning: beta={beta:.5f}  tuning perplexity {ppl:.3f}{'  (uniform, reference only)' if beta == 0 else ''}[/dim]", highlight=False)
    finally:
        for k, (_, lin) in lins.items():
            lin.weight.data.copy_(dense[k])
        del dense
    cands = [r for r in rows if r["candidate"] and math.isfinite(r["tune_ppl"])]
    if not cands:
        raise UserError("ATP tuning produced no finite perplexity; pass --atp-beta explicitly")
    best = min(cands, key=lambda r: r["tune_ppl"])
    return best["beta"], {"grid": rows, "chosen": best["beta"], "range": [0.0, hi], "seconds": time.perf_counter() - t0,
                          "proxy": "dense-pass Wanda statistics, masks per beta" if not use_magnitude else "magnitude masks per beta"}


def allocate(
    model: Any, recipe: CompressRecipe, calib_ids: torch.Tensor, tune_ids: torch.Tensor | None, device: str, progress: bool
) -> tuple[list[float], list[int] | None, dict[str, Any]]:
    """(per-block rates, per-block N for mixed:M or None, allocation details for the manifest)."""
    from .allocation import atp_rates, owl_rates, rmi_rates, uniform_rates
    from .pruning.masks import mixed_n_per_block
    from .sequential import collect_block_grams, collect_outlier_ratios

    L = len(find_blocks(model)[1])
    S = recipe.target_sparsity
    weights = _block_weights(model, recipe.ignore)
    info: dict[str, Any] = {"method": recipe.allocation}
    t0 = time.perf_counter()
    if recipe.allocation == "uniform":
        rates = uniform_rates(L, S, weights)
    elif recipe.allocation == "atp":
        if isinstance(recipe.atp_beta, float):
            beta = recipe.atp_beta
        else:
            assert tune_ids is not None
            beta, tune = _tune_atp(model, calib_ids, tune_ids, recipe, weights, device, progress)
            info["tuning"] = tune
        info["beta"] = beta
        rates = atp_rates(L, S, beta, weights)
    elif recipe.allocation == "owl":
        ratios = collect_outlier_ratios(model, calib_ids, recipe.owl_m, ignore=recipe.ignore, device=device,
                                        offload=recipe.offload, progress=progress)
        info.update({"m": recipe.owl_m, "lambda": recipe.owl_lambda, "outlier_ratios": ratios})
        rates = owl_rates(ratios, S, recipe.owl_lambda, weights)
    elif recipe.allocation == "rmi":
        from .allocation import rmi_delta, rmi_importance

        grams = collect_block_grams(model, calib_ids, device=device, offload=recipe.offload, progress=progress)
        _, redundancy, importance = rmi_importance(grams, recipe.rmi_beta)
        info.update({"beta": recipe.rmi_beta, "delta": rmi_delta(S), "redundancy": list(redundancy), "importance": list(importance)})
        rates = rmi_rates(grams, S, recipe.rmi_beta, None, weights)
    else:  # validated earlier
        raise UserError(f"unknown allocation '{recipe.allocation}'")
    info["seconds"] = time.perf_counter() - t0
    kind, _, m = pattern_parts(recipe.pattern)
    ns = mixed_n_per_block(rates, m, S, weights) if kind == "mixed" else None
    return [float(r) for r in rates], ns, info


# -------------------------------------------------------------------------------------------- data
def _calibration(model: Any, tok: Any, recipe: CompressRecipe, n_tune: int) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Calibration windows, plus held-out tuning windows for ATP auto (disjoint from the calibration ones).

    For a text source the tuning windows are the next `n_tune` draws of the same seeded sampler (the sampler
    takes one new document per window, so they come from documents the calibration did not use, when the source
    has enough long documents); for `self` they are generated with another seed; `--tune-data` overrides both.
    """
    from .data import SELF, calibration_ids, eval_text

    t0 = time.perf_counter()
    tune_ids = None
    tune_info: dict[str, Any] = {}
    if n_tune and recipe.tune_data is None and recipe.calib_data != SELF:
        ids = calibration_ids(tok, recipe.calib_data, recipe.nsamples + n_tune, recipe.seqlen, recipe.seed, model=model)
        calib, tune_ids = ids[: recipe.nsamples], ids[recipe.nsamples :]
        calib_rows = {tuple(r.tolist()) for r in calib}
        overlap = sum(tuple(r.tolist()) in calib_rows for r in tune_ids)
        tune_info = {"source": recipe.calib_data, "windows": n_tune, "seqlen": recipe.seqlen,
                     "how": f"draws {recipe.nsamples}..{recipe.nsamples + n_tune - 1} of the calibration sampler", "identical_to_calibration": overlap}
    else:
        calib = _calibration_windows(model, tok, recipe)
        if n_tune and recipe.tune_data is not None:
            ids = tok(eval_text(recipe.tune_data), return_tensors="pt").input_ids[0]
            usable = (ids.numel() // recipe.seqlen)
            if usable < 1:
                raise UserError(f"--tune-data has {ids.numel()} tokens, fewer than one window of --seqlen {recipe.seqlen}")
            k = min(n_tune, usable)
            tune_ids = ids[: k * recipe.seqlen].view(k, recipe.seqlen)
            tune_info = {"source": recipe.tune_data, "windows": k, "seqlen": recipe.seqlen, "how": "first windows"}
        elif n_tune:
            tune_ids = calibration_ids(tok, SELF, n_tune, recipe.seqlen, recipe.seed + 1_000_003, model=model)
            tune_info = {"source": "self", "windows": n_tune, "seqlen": recipe.seqlen, "how": f"generated with seed {recipe.seed + 1_000_003}"}
    return calib, tune_ids, {"tuning": tune_info, "seconds": time.perf_counter() - t0}


def _calibration_windows(model: Any, tok: Any, recipe: CompressRecipe) -> torch.Tensor:
    """The calibration windows; for LoSA on self text, the first training sequences (no second generation)."""
    from .data import SELF, calibration_ids
    from .losa.train import self_train_seed, shares_self_text

    if shares_self_text(recipe):
        ids = calibration_ids(tok, SELF, recipe.losa_train_samples, recipe.seqlen, self_train_seed(recipe.seed),
                              model=model)
        return ids[: recipe.nsamples]
    return calibration_ids(tok, recipe.calib_data, recipe.nsamples, recipe.seqlen, recipe.seed, model=model)


# -------------------------------------------------------------------------------------------- LoSA
def _run_losa(model: Any, tok: Any, recipe: CompressRecipe, calib_ids: torch.Tensor, work_dir: Path,
              progress: bool) -> Any:
    """Hand over to `losa_deploy.losa.run.run_losa` (the LoSA loop around this pipeline), or for `--method
    dense-lora` to `losa_deploy.losa.baseline.run_dense_lora` (the naive baseline); returns its `LosaResult`."""
    if recipe.method == "dense-lora":
        from .losa.baseline import run_dense_lora as run_losa
    else:
        from .losa.run import run_losa
    return run_losa(model, tok, recipe, work_dir, calib_ids=calib_ids, progress=progress)


# -------------------------------------------------------------------------------------------- main
def run_compress(
    recipe: CompressRecipe, *, progress: bool = True, command: str | None = None, profile: str | None = None
) -> dict[str, Any]:
    """Do the whole `compress` and return the manifest written to `recipe.out`."""
    from .cpu_gemm import cpu_gemm

    recipe.validate()
    with cpu_gemm() as gemm:
        return _run_compress(recipe, progress=progress, command=command, profile=profile, cpu_gemm=gemm)


def _run_compress(
    recipe: CompressRecipe, *, progress: bool, command: str | None, profile: str | None, cpu_gemm: str
) -> dict[str, Any]:
    from .artifact import remove_stale_partials, save_checkpoint, work_dir as losa_work_dir, write_manifest
    from .atomic import atomic_dir
    from .data import eval_text
    from .evaluation.perplexity import perplexity, tokenize_eval_text
    from .manifest import build_manifest
    from .models import load_model, resolve_device
    from .sequential import block_compute, check_realised, prune_sequential

    if recipe.method in ADAPTER_METHODS:  # option clashes refused before the model is even loaded
        from .losa.run import validate_losa

        validate_losa(recipe)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(recipe.out).expanduser()
    device = resolve_device(recipe.device)
    calib_dtype = resolve_calib_dtype(recipe.calib_dtype, device)
    remove_stale_partials(out)
    check_room(recipe, out)

    t0 = time.perf_counter()
    model, tok = load_model(recipe.model, dtype=recipe.dtype, device="cpu" if recipe.offload else device)
    timings["load_s"] = time.perf_counter() - t0
    check_model_against_recipe(model, recipe)
    if recipe.method in ADAPTER_METHODS and recipe.losa_objective == "distill":  # needs the model's size
        from .losa.run import check_teacher_room

        check_teacher_room(model, recipe.device)
    blocks_name, blocks = find_blocks(model)
    L = len(blocks)
    S = recipe.target_sparsity
    kind, pn, pm = pattern_parts(recipe.pattern)

    eval_ids = None
    if recipe.eval_data:
        eval_ids = tokenize_eval_text(tok, eval_text(recipe.eval_data))
        usable = eval_ids.numel() if recipe.eval_max_tokens is None else min(eval_ids.numel(), recipe.eval_max_tokens)
        if usable < recipe.eval_seqlen:
            raise UserError(f"--eval-data has {usable} usable tokens, fewer than one window of --eval-seqlen {recipe.eval_seqlen}")

    tuning_auto = recipe.allocation == "atp" and not isinstance(recipe.atp_beta, float)  # LoSA refused that above
    # Magnitude scores ignore the data; only OWL / RMI / ATP-auto allocations would read it.
    data_free = recipe.method == "magnitude" and recipe.allocation in ("uniform", "atp") and not tuning_auto
    if data_free:
        calib_ids, tune_ids, cal_info = None, None, {"tuning": {}, "seconds": 0.0}
    else:
        calib_ids, tune_ids, cal_info = _calibration(model, tok, recipe, recipe.tune_samples if tuning_auto else 0)
    timings["calibration_data_s"] = cal_info["seconds"]

    def ppl() -> dict[str, Any]:
        t = time.perf_counter()
        if recipe.offload:
            model.to(device)
        r = perplexity(model, eval_ids, recipe.eval_seqlen, max_tokens=recipe.eval_max_tokens, progress=progress)
        if recipe.offload:
            model.to("cpu")
        d = r.to_dict()
        d["seconds"] = time.perf_counter() - t
        return d

    evals: dict[str, Any] = {}
    if eval_ids is not None:
        evals = {"data": recipe.eval_data, "seqlen": recipe.eval_seqlen, "max_tokens": recipe.eval_max_tokens}
        if recipe.eval_before:
            evals["before"] = ppl()
            timings["eval_before_s"] = evals["before"]["seconds"]
            err.print(f"[dim]perplexity before: {evals['before']['perplexity']:.4f}[/dim]", highlight=False)

    losa_info: dict[str, Any] | None = None
    blocks_out: list[dict[str, Any]] = []
    linears_out: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    alloc_info: dict[str, Any] = {}
    with block_compute(calib_dtype):
        if recipe.method in ADAPTER_METHODS:
            work_dir = losa_work_dir(out)
            t0 = time.perf_counter()
            try:
                lres = _run_losa(model, tok, recipe, calib_ids, work_dir, progress)
            except KeyboardInterrupt as e:  # the work state stays for --resume; say so in the one-line message
                from .losa.state import STATE_FILE

                if recipe.method == "losa" and (work_dir / STATE_FILE).is_file():
                    hint = f"LoSA state of the last finished step kept in {work_dir}; rerun with --resume"
                    e.hint = hint  # type: ignore[attr-defined]
                raise
            timings["losa_s"] = time.perf_counter() - t0
            losa_info, masks = dict(lres.manifest), dict(lres.masks)
            rates = [float(r) for r in (lres.block_rates or losa_info.get("rates") or [S] * L)]
            ranks = list(lres.block_ranks or losa_info.get("ranks") or [])
            block_nm = list(getattr(lres, "block_nm", []) or [None] * L)
            lins = prunable_linears(model, recipe.ignore)
            for name, mask in masks.items():
                if name not in lins:
                    raise RuntimeError(f"LoSA returned a mask for {name}, which is not a prunable linear")
                bi, lin = lins[name]
                n_, m_ = block_nm[bi] if block_nm[bi] else (0, 0)
                target = float(lres.targets.get(name, 1 - n_ / m_ if m_ else rates[bi]))
                # Verified here again, independently of LoSA's own check: the artefact's contract.
                linears_out[name] = {"target": target, "realised": check_realised(name, lin.weight.data, mask, target, n_, m_),
                                     "pattern": f"{n_}:{m_}" if m_ else "unstructured", "block": bi}
            for i in range(L):
                b: dict[str, Any] = {"index": i, "rate": rates[i]}
                if block_nm[i]:
                    b["n_m"] = f"{block_nm[i][0]}:{block_nm[i][1]}"
                if ranks:
                    b["rank"] = int(ranks[i])
                blocks_out.append(b)
            alloc_info = {"method": f"{recipe.allocation} ({'LoSA' if recipe.method == 'losa' else recipe.method})"}
        else:
            rates, ns, alloc_info = allocate(model, recipe, calib_ids, tune_ids, device, progress)
            timings["allocation_s"] = alloc_info["seconds"]
            spec = PruneSpec(recipe.method, recipe.pattern, ns, tuple(recipe.ignore), recipe.blocksize, recipe.percdamp)
            t0 = time.perf_counter()
            res = prune_sequential(model, calib_ids, spec, rates, device=device, offload=recipe.offload, progress=progress)
            timings["prune_s"] = time.perf_counter() - t0
            timings.update({f"prune_{k}": v for k, v in res.timings.items()})
            masks = res.masks
            warnings += res.warnings
            for name in masks:
                linears_out[name] = {"target": res.targets[name], "realised": res.realised[name], "pattern": res.patterns[name],
                                     "block": int(name[len(blocks_name) + 1 :].split(".", 1)[0])}
            for i in range(L):
                b = {"index": i, "rate": res.block_rates[i]}
                if res.block_nm[i] is not None:
                    b["n_m"] = f"{res.block_nm[i][0]}:{res.block_nm[i][1]}"
                blocks_out.append(b)
            if recipe.method == "sparsegpt":
                retries = {k: v for k, v in res.sparsegpt_info.items() if v.get("damping_retries")}
                alloc_info["sparsegpt_damping_retries"] = retries
    for b in blocks_out:
        pre = block_prefix(blocks_name, b["index"])
        ws = [(n, d) for n, d in linears_out.items() if n.startswith(pre)]
        tot = sum(prunable_linears_numel(model, n) for n, _ in ws)
        b["realised"] = sum(d["realised"] * prunable_linears_numel(model, n) for n, d in ws) / tot if tot else 0.0

    if eval_ids is not None:
        evals["after"] = ppl()
        timings["eval_after_s"] = evals["after"]["seconds"]

    total_pruned = sum(prunable_linears_numel(model, n) for n in linears_out)
    zeros = sum(d["realised"] * prunable_linears_numel(model, n) for n, d in linears_out.items())
    all_params = sum(p.numel() for p in model.parameters())
    timings["total_s"] = time.perf_counter() - t_all
    manifest = build_manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=command,
        profile=profile,
        recipe=recipe.to_dict() | {"target_sparsity": S},
        model={"source": recipe.model, "architecture": type(model).__name__, "blocks": L, "blocks_path": blocks_name,
               "parameters": all_params},
        sparsity={"target": S, "realised_pruned_linears": zeros / total_pruned if total_pruned else 0.0,
                  "realised_all_parameters": zeros / all_params, "pruned_linear_parameters": total_pruned},
        allocation=alloc_info,
        blocks=blocks_out,
        linears=linears_out,
        calibration=({"source": None, "note": "magnitude pruning with these rates reads no data; calibration flags unused"}
                     if calib_ids is None else
                     {"source": recipe.calib_data, "nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
                      "seed": recipe.seed, "tokens": int(calib_ids.numel()), "tuning": cal_info["tuning"] or None,
                      "forward_dtype": str(calib_dtype or next(model.parameters()).dtype).removeprefix("torch."),
                      "cpu_gemm": cpu_gemm if torch.device(device).type == "cpu" else None}),
        timings=timings,
        memory={"peak_rss_mb": peak_rss_mb(),
                **({"peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.device(device).type == "cuda" else {})},
        eval=evals or None,
        warnings=warnings,
        **({"losa": losa_info} if losa_info is not None else {}),
    )
    model.to("cpu")
    with atomic_dir(out, overwrite=recipe.overwrite) as tmp:
        save_checkpoint(tmp, model, tok, masks)
        write_manifest(tmp, manifest)
        for fname in (losa_info or {}).get("files", []):  # e.g. losa_schedule.png, written into the work dir
            src = losa_work_dir(out) / fname
            if src.is_file():
                shutil.copy2(src, tmp / fname)
    if recipe.method in ADAPTER_METHODS:
        shutil.rmtree(losa_work_dir(out), ignore_errors=True)
    return manifest


def check_room(recipe: CompressRecipe, out: Path) -> None:
    """Before the model is loaded: `out` writable, and about enough free space for the checkpoint it will hold
    (weights at --dtype, one mask byte per weight, and for LoSA its step checkpoint beside it)."""
    from .artifact import check_output_room, checkpoint_bytes
    from .models import resolve_model

    check_output_room(out, 0)  # writable, before an alias's first dequantisation
    src = resolve_model(recipe.model)
    if src.is_local:
        value_bytes = 4 if recipe.dtype == "float32" else 2
        params = checkpoint_bytes(src.path, 1)
        need = params * (value_bytes + 1) + 16 * 2**20  # + tokenizer and config, generously
        if recipe.method in ADAPTER_METHODS:
            need += params * 5  # losa_state.pt: fp32 prunable weights and their masks (adapters are small)
        check_output_room(out, need)


def resolve_calib_dtype(name: str, device: str) -> torch.dtype | None:
    """The autocast dtype of the calibration block forwards (None: the model's own, float32 by default)."""
    from .losa.train import bf16_autocast_supported

    if name == "float32":
        return None
    native = bf16_autocast_supported(device)
    if name == "auto":
        return torch.bfloat16 if native else None
    if not native:
        err.print("[yellow]warning:[/yellow] --calib-dtype bfloat16 on hardware without native bf16: emulated, slower than float32",
                  highlight=False)
    return torch.bfloat16


def prunable_linears_numel(model: Any, weight_name: str) -> int:
    return int(model.get_parameter(weight_name).numel())


def command_line() -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in ["losa-deploy", *sys.argv[1:]])
