"""The LoSA loop (METHODS §4): T steps of merge -> RMI rates -> prune -> un-merge -> ranks -> fine-tune.

Everything model-facing goes through the shared pipeline (`sequential.prune_sequential`,
`sequential.collect_block_grams`) and the pure math (`allocation`, `pruning.masks`); this module only adds the
adapter bookkeeping, the schedules, training and checkpoints. Sparsity is exact at every step: masks are
explicit, the adapter update is masked, and the zero pattern is checked after every step and after the final merge.

Fixed N:M and mixed:M patterns: the intermediate steps (S_t < S) prune unstructured at S_t, the last step applies
the N:M pattern (mixed: per-block N from the RMI rates via `mixed_n_per_block`), because an N:M pattern has no
intermediate sparsities to schedule through.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import UserError
from .adapter import AdapterSet, attach_adapters, check_zero_pattern, merge_into, set_rank, unmerge_from
from .ranks import allocate_ranks, uniform_ranks
from .schedule import rank_schedule, sparsity_schedule
from .state import load_state, recipe_fingerprint, rng_state, save_state, set_rng_state
from .train import (batches, bf16_autocast_supported, build_train_samples, make_optimizer, num_batches,
                    reset_inactive_state, split_slices, train_slice)

PLOT_FILE = "losa_schedule.png"
LOSA_ALLOCATIONS = ("rmi", "uniform", "atp")


def step_atp_beta(beta: float, num_blocks: int, sparsity: float) -> float:
    """ATP's step for one LoSA step: the recipe's beta, capped at the legal maximum for this step's target.

    The legal range shrinks with min(S_t, 1-S_t), so an early, low S_t may not admit the beta tuned for the final S;
    at the cap (S_t >= 0.5) the last block would be 100% sparse, hence the factor just below 1.
    """
    from ..allocation import atp_beta_range

    _, hi = atp_beta_range(num_blocks, sparsity)
    return min(float(beta), hi * (1.0 - 1e-9))


def block_rates_at(model: nn.Module, recipe: Any, calib_ids: Tensor, sparsity: float,
                   weights: Sequence[float] | None, num_blocks: int, progress: bool) -> list[float]:
    """Per-block rates for one target on the current (merged) model: RMI, ATP with a fixed beta, or uniform."""
    from ..allocation import atp_rates, rmi_rates, uniform_rates
    from ..sequential import collect_block_grams

    if recipe.allocation == "rmi":
        grams = collect_block_grams(model, calib_ids, device=str(recipe.device), offload=recipe.offload,
                                    progress=progress)
        return rmi_rates(grams, sparsity, beta=recipe.rmi_beta, weights=weights)
    if recipe.allocation == "atp":
        return atp_rates(num_blocks, sparsity, step_atp_beta(recipe.atp_beta, num_blocks, sparsity), weights)
    return uniform_rates(num_blocks, sparsity, weights)


@dataclass
class LosaResult:
    """What `compress` needs: final masks (True = keep), the manifest's "losa" section, per-block data, files."""

    masks: dict[str, Tensor]
    manifest: dict[str, Any]
    block_rates: list[float] = field(default_factory=list)
    block_ranks: list[int] = field(default_factory=list)
    block_nm: list[tuple[int, int] | None] = field(default_factory=list)
    realised: dict[str, float] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    patterns: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # name in the output dir -> file written in work_dir


def _recipe_dict(recipe: Any) -> dict[str, Any]:
    return recipe.to_dict() if hasattr(recipe, "to_dict") else dict(vars(recipe))


def validate_losa(recipe: Any, model: nn.Module | None = None) -> None:
    """Checks that need no work done yet (one-line UserErrors); `model` enables the teacher-memory check.

    Also the checks of `--method dense-lora` (`baseline.run_dense_lora`), which takes the same flags; it runs one
    shot (T = 1), so the per-step data split does not apply to it and it cannot resume.
    """
    from ..recipe import pattern_parts

    method = getattr(recipe, "method", "losa")
    if method == "dense-lora" and getattr(recipe, "resume", False):
        raise UserError("--resume applies to --method losa only: a dense-lora run is one shot, start it again")

    if recipe.losa_steps < 1:
        raise UserError(f"--steps must be >= 1 (got {recipe.losa_steps})")
    if recipe.losa_rank_cap < 1:
        raise UserError(f"--rank-cap must be >= 1 (got {recipe.losa_rank_cap})")
    if method == "dense-lora":  # one rank, --rank-end, for every block
        if not 1 <= recipe.losa_rank_max <= recipe.losa_rank_cap:
            raise UserError(f"--rank-end ({recipe.losa_rank_max}) must lie in [1, --rank-cap {recipe.losa_rank_cap}]")
    elif not 1 <= recipe.losa_rank_min <= recipe.losa_rank_cap or not 1 <= recipe.losa_rank_max <= recipe.losa_rank_cap:
        raise UserError(
            f"--rank-start ({recipe.losa_rank_min}) and --rank-end ({recipe.losa_rank_max}) must lie in [1, --rank-cap {recipe.losa_rank_cap}]"
        )
    if recipe.losa_objective not in ("lm", "distill"):
        raise UserError(f"unknown --objective '{recipe.losa_objective}': use lm or distill")
    if recipe.losa_mask_method not in ("wanda", "sparsegpt"):
        raise UserError(f"unknown --mask-method '{recipe.losa_mask_method}': use wanda or sparsegpt")
    if recipe.allocation not in LOSA_ALLOCATIONS:
        raise UserError(f"--method {method} allocates with rmi, atp or uniform, not '{recipe.allocation}'")
    if recipe.allocation == "atp" and not isinstance(recipe.atp_beta, float):
        raise UserError(f"--method {method} --allocation atp needs a numeric --atp-beta (tune one with "
                        "'compress --method wanda --allocation atp --atp-beta auto' and reuse its manifest's beta)")
    if not recipe.losa_lr > 0:
        raise UserError(f"--lr must be > 0 (got {recipe.losa_lr})")
    if not 0 <= recipe.losa_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1) (got {recipe.losa_dropout})")
    if method != "dense-lora" and recipe.losa_train_samples < recipe.losa_steps:
        raise UserError(f"--train-samples ({recipe.losa_train_samples}) must be at least --steps ({recipe.losa_steps}): every step trains on its own slice")
    pattern_parts(recipe.pattern)
    if model is not None and recipe.losa_objective == "distill":
        check_teacher_room(model, recipe.device)


def teacher_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def check_teacher_room(model: nn.Module, device: str) -> None:
    """Distillation keeps a frozen copy of the dense model: refuse up front when the device cannot hold it."""
    need = teacher_bytes(model)
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
    else:
        import psutil

        free = psutil.virtual_memory().available
    # The copy itself plus headroom for its activations and the student's training memory.
    if need * 1.5 > free:
        raise UserError(
            f"--objective distill needs room for a dense teacher copy ({need / 2**30:.2f} GiB) on {device} "
            f"but only {free / 2**30:.2f} GiB is free; use --objective lm"
        )


def _merged_zero_check(adapters: AdapterSet) -> int:
    """Verify (W_base + delta ⊙ M) has exact zeros off the mask for every linear, without touching W."""
    kept_zero = 0
    with torch.no_grad():
        for name, a in adapters.adapters.items():
            w = adapters.linears[name].weight
            merged = w.float() + a.delta().detach()
            merged = merged.to(w.dtype)
            kept_zero += check_zero_pattern(merged, a.mask, name)
    return kept_zero


def run_losa(
    model: nn.Module,
    tokenizer: Any,
    recipe: Any,
    work_dir: str | Path,
    calib_ids: Tensor | None = None,
    progress: bool = True,
    on_step_end: Callable[[int], None] | None = None,
) -> LosaResult:
    """Run LoSA on `model` in place; on return its prunable linears hold the merged sparse weights.

    `work_dir` must outlive an interrupted run (not a temporary output directory): it holds `losa_state.pt`,
    rewritten after every step, and `losa_schedule.png` (listed in `LosaResult.files`). With `recipe.resume` a
    run continues after the last complete step; the result equals that of an uninterrupted run.
    """
    from ..data import calibration_ids
    from ..model_parts import block_param_counts, find_blocks, prunable_linears
    from ..pruning.masks import mixed_n_per_block
    from ..recipe import PruneSpec, pattern_parts
    from ..sequential import prune_sequential

    t_all = time.perf_counter()
    validate_losa(recipe, model)
    work_dir = Path(work_dir)
    device = str(recipe.device)
    T = int(recipe.losa_steps)
    S = float(recipe.target_sparsity)
    kind, n_fixed, m_fixed = pattern_parts(recipe.pattern)
    targets = sparsity_schedule(S, T)
    omegas = rank_schedule(recipe.losa_rank_min, recipe.losa_rank_max, T)
    r_max = int(recipe.losa_rank_cap)
    ignore = list(recipe.ignore or [])
    _, blocks = find_blocks(model)
    L = len(blocks)
    weights = block_param_counts(model, ignore)

    if calib_ids is None:
        calib_ids = calibration_ids(tokenizer, recipe.calib_data, recipe.nsamples, recipe.seqlen, recipe.seed, model=model)
    fingerprint = recipe_fingerprint(_recipe_dict(recipe), calib_ids)
    # A resume from another recipe is refused before any expensive work (data generation, pruning).
    resume_state = load_state(work_dir, fingerprint) if recipe.resume else None

    # Training data first (it may generate text with the dense model), split into T disjoint slices.
    samples = build_train_samples(tokenizer, recipe.losa_train_data, recipe.losa_train_samples,
                                  recipe.losa_train_seqlen, recipe.seed, model=model)
    slices = split_slices(len(samples), T)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    bs = int(recipe.losa_batch_size)
    total_updates = sum(num_batches(e - s, bs) for s, e in slices)

    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    lin = prunable_linears(model, ignore)
    dense_state = {name: l.weight.detach().to("cpu", copy=True) for name, (_, l) in lin.items()}
    dense_outputs: dict[int, Tensor] = {}  # the dense reference on calib_ids, the same at every step
    teacher = None
    teacher_dtype = None
    if recipe.losa_objective == "distill":
        teacher = copy.deepcopy(model).eval()
        teacher_dtype = str(next(teacher.parameters()).dtype).replace("torch.", "")
    use_bf16 = bf16_autocast_supported(device)

    adapters = attach_adapters(lin, r_max, recipe.losa_alpha, recipe.losa_dropout, seed=recipe.seed)
    params = list(adapters.parameters())
    # wsd: the peak lr holds until the last step, which then decays to 0 (the final sparsity gets full-size updates).
    decay_from = (total_updates - num_batches(slices[-1][1] - slices[-1][0], bs)
                  if recipe.losa_lr_schedule == "wsd" else None)
    opt, sched = make_optimizer(params, recipe.losa_lr, total_updates, decay_from=decay_from)
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    start = 1
    resumed_from = None
    if resume_state is not None:
        st = resume_state
        with torch.no_grad():
            for name, w in st["weights"].items():
                adapters.linears[name].weight.copy_(w)
        adapters.load_state_dict(st["adapters"], st["ranks"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        history, losses = st["history"], st["losses"]
        start = int(st["step"]) + 1
        resumed_from = int(st["step"])
        set_rng_state(st["rng"])

    final_block_rates: list[float] = history[-1]["block_rates"] if history else []
    final_ranks: list[int] = history[-1]["block_ranks"] if history else []
    last_prune = None
    try:
        for t in range(start, T + 1):
            S_t, omega = targets[t - 1], omegas[t - 1]
            timing: dict[str, float] = {}
            # (1) merge the masked adapter into the weights; adapters off while the plain model is pruned.
            t0 = time.perf_counter()
            for name, a in adapters.adapters.items():
                merge_into(adapters.linears[name].weight, a)
            adapters.set_enabled(False)
            timing["merge_s"] = time.perf_counter() - t0
            # (2) block rates for S_t on the merged model.
            t0 = time.perf_counter()
            rates = block_rates_at(model, recipe, calib_ids, S_t, weights, L, progress)
            timing["rmi_s"] = time.perf_counter() - t0
            # (3) prune the merged weights block by block (masks recomputed, so they may regrow).
            t0 = time.perf_counter()
            last_step = t == T
            if last_step and kind == "nm":
                spec = PruneSpec(method=recipe.losa_mask_method, pattern=recipe.pattern, ignore=ignore,
                                 blocksize=recipe.blocksize, percdamp=recipe.percdamp)
            elif last_step and kind == "mixed":
                n_per = mixed_n_per_block(rates, m_fixed, S, weights)
                spec = PruneSpec(method=recipe.losa_mask_method, pattern=recipe.pattern, n_per_block=n_per,
                                 ignore=ignore, blocksize=recipe.blocksize, percdamp=recipe.percdamp)
            else:
                spec = PruneSpec(method=recipe.losa_mask_method, pattern="unstructured", ignore=ignore,
                                 blocksize=recipe.blocksize, percdamp=recipe.percdamp)
            res = prune_sequential(model, calib_ids, spec, rates, device=device, offload=recipe.offload,
                                   dense_state=dense_state, progress=progress, dense_outputs=dense_outputs)
            last_prune = res
            timing["prune_s"] = time.perf_counter() - t0
            # (4) un-merge against the new mask: W_base = W_pruned - delta ⊙ M_new.
            t0 = time.perf_counter()
            regrown = 0
            for name, a in adapters.adapters.items():
                new_mask = res.masks[name].to(a.mask.device)
                regrown += int((new_mask & ~a.mask).sum())
                a.mask.copy_(new_mask)
                unmerge_from(adapters.linears[name].weight, a)
                check_zero_pattern(adapters.linears[name].weight, a.mask, name)
            # (5) ranks from the reconstruction errors; a rank change re-bases W so the function is unchanged.
            if getattr(recipe, "losa_uniform_ranks", False):
                ranks = uniform_ranks(L, omega, r_max)
            else:
                ranks = allocate_ranks(res.recon_error, omega, r_max)
            for name, a in adapters.adapters.items():
                set_rank(adapters.linears[name].weight, a, ranks[adapters.block_of[name]])
                reset_inactive_state(opt, a.A, a.B, a.rank)
            adapters.set_enabled(True)
            timing["merge_s"] += time.perf_counter() - t0
            # (6) fine-tune the adapters on this step's own slice.
            t0 = time.perf_counter()
            s0, s1 = slices[t - 1]
            adapters.train(True)
            step_losses = train_slice(
                model, params, batches(samples[s0:s1], bs, pad_id), opt, sched, objective=recipe.losa_objective,
                teacher=teacher, device=device, autocast=use_bf16, desc=f"LoSA step {t}/{T} training", progress=progress,
            )
            adapters.train(False)
            losses.extend(step_losses)
            timing["train_s"] = time.perf_counter() - t0
            kept_zero = _merged_zero_check(adapters)
            history.append({
                "step": t, "sparsity_target": S_t, "omega": omega, "block_rates": [float(r) for r in res.block_rates],
                "block_nm": [list(x) if x else None for x in res.block_nm],
                "block_ranks": ranks, "recon_error": [float(e) for e in res.recon_error],
                "realised_sparsity": _mean_sparsity(res.masks), "regrown_weights": regrown,
                "kept_weights_exactly_zero": kept_zero, "train_samples": [s0, s1], "optimizer_steps": len(step_losses),
                "train_loss_mean": (sum(step_losses) / len(step_losses)) if step_losses else None,
                "timings": timing, "prune_timings": res.timings, "warnings": res.warnings,
            })
            final_block_rates, final_ranks = history[-1]["block_rates"], ranks
            state = {
                "fingerprint": fingerprint, "step": t,
                "weights": {n: l.weight.detach().cpu().clone() for n, l in adapters.linears.items()},
                "adapters": adapters.state_dict(), "ranks": adapters.ranks(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
                "history": history, "losses": losses,
                "masks": {n: a.mask.cpu().clone() for n, a in adapters.adapters.items()},
            }
            save_state(work_dir, state)
            if on_step_end is not None:
                on_step_end(t)
    finally:
        adapters.remove()  # never leave hooks on the caller's model

    # Final merge: W + (alpha/r)(B A) ⊙ M; verify exact zeros off the mask for every linear.
    t0 = time.perf_counter()
    masks: dict[str, Tensor] = {}
    kept_zero = 0
    for name, a in adapters.adapters.items():
        w = adapters.linears[name].weight
        merge_into(w, a)
        kept_zero += check_zero_pattern(w, a.mask, name)
        masks[name] = a.mask.detach().cpu().clone()
    merge_final_s = time.perf_counter() - t0
    realised = {n: 1.0 - float(m.float().mean()) for n, m in masks.items()}
    if last_prune is not None:
        tgt, pats, block_nm = dict(last_prune.targets), dict(last_prune.patterns), list(last_prune.block_nm)
    else:  # resumed after the last step: nothing was pruned in this process
        tgt = {n: float(final_block_rates[adapters.block_of[n]]) for n in masks}
        pats = {n: "unstructured" for n in masks}
        block_nm = [tuple(x) if x else None for x in history[-1]["block_nm"]]
    files: dict[str, Path] = {}
    try:
        from .plot import plot_schedule

        files[PLOT_FILE] = plot_schedule(history, work_dir / PLOT_FILE,
                                         title=f"LoSA {recipe.losa_mask_method}+{recipe.allocation}, S={S:g}, T={T}")
    except Exception as e:  # a missing plot must not lose a finished compression
        from ..console import err

        err.print(f"[yellow]warning:[/yellow] LoSA schedule plot not written: {type(e).__name__}: {e}", highlight=False)
    totals = {k: sum(h["timings"].get(k, 0.0) for h in history) for k in ("rmi_s", "prune_s", "train_s", "merge_s")}
    totals["merge_s"] += merge_final_s
    manifest = {
        "steps": history,
        "schedule": {"sparsity": targets, "omega": omegas, "rank_cap": r_max},
        "objective": recipe.losa_objective, "mask_method": recipe.losa_mask_method, "allocation": recipe.allocation,
        "atp_beta": ({"recipe": recipe.atp_beta, "per_step": [step_atp_beta(recipe.atp_beta, L, x) for x in targets]}
                     if recipe.allocation == "atp" else None),
        "rank_allocation": "uniform" if getattr(recipe, "losa_uniform_ranks", False) else "reconstruction-error",
        "train_data": recipe.losa_train_data, "train_samples": len(samples), "train_seqlen": recipe.losa_train_seqlen,
        "batch_size": bs, "optimizer": {"name": "AdamW", "lr": recipe.losa_lr, "weight_decay": 0.0, "warmup": 0.3,
                                        "schedule": recipe.losa_lr_schedule, "decay_from": decay_from, "total_steps": total_updates, "max_grad_norm": 1.0},
        "alpha": recipe.losa_alpha, "dropout": recipe.losa_dropout, "adapter_form": adapters.form, "autocast": "bfloat16" if use_bf16 else None,
        "teacher_dtype": teacher_dtype, "loss_curve": losses, "final_ranks": final_ranks,
        "kept_weights_exactly_zero": kept_zero, "resumed_from_step": resumed_from,
        "timings": {**totals, "total_s": time.perf_counter() - t_all},
        "zero_pattern_verified": True,
        "rates": [float(r) for r in final_block_rates], "ranks": [int(r) for r in final_ranks],
        "files": sorted(files),
    }
    return LosaResult(masks=masks, manifest=manifest, block_rates=final_block_rates, block_ranks=list(final_ranks),
                      block_nm=block_nm, realised=realised, targets=tgt, patterns=pats, files=files)


def _mean_sparsity(masks: dict[str, Tensor]) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return 1.0 - kept / max(1, total)
