"""The naive baseline LoSA is compared with (`compress --method dense-lora`): prune, dense LoRA, merge, re-prune.

What users try today: prune once to the target S (Wanda or SparseGPT, `--mask-method`, through the same sequential
pipeline and allocation as LoSA), train a plain LoRA (the update B A is *not* masked) on the same data with the same
optimiser, schedule and budget (`--train-samples`, all of it in one go), merge W + (alpha/r) B A (dense: the
sparsity is lost), then prune the merged model to S again with the same mask method and allocation. One shot
(T = 1 by construction: `--steps` and `--rank-start` do not apply); every block gets rank `--rank-end`.

No resume: the run is one shot and keeps no state in `work_dir` (`--resume` with it is a UserError).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import UserError
from .adapter import attach_adapters, check_zero_pattern, merge_into
from .run import LosaResult, _mean_sparsity, block_rates_at, validate_losa
from .train import batches, bf16_autocast_supported, build_train_samples, make_optimizer, num_batches, train_slice

VARIANT = "dense-lora"


def run_dense_lora(
    model: nn.Module,
    tokenizer: Any,
    recipe: Any,
    work_dir: str | Path,
    calib_ids: Tensor | None = None,
    progress: bool = True,
) -> LosaResult:
    """Run the dense-LoRA baseline on `model` in place; on return its prunable linears hold the re-pruned weights.

    Returns a `LosaResult` like `run_losa` (`compress` handles both the same way); its manifest section has
    `"variant": "dense-lora"`. `work_dir` is accepted for the same call shape and left unused: nothing to resume.
    """
    from ..data import calibration_ids
    from ..model_parts import block_param_counts, find_blocks, prunable_linears
    from ..pruning.masks import mixed_n_per_block
    from ..recipe import PruneSpec, pattern_parts
    from ..sequential import prune_sequential

    t_all = time.perf_counter()
    if getattr(recipe, "resume", False):
        raise UserError("--resume applies to --method losa only: a dense-lora run is one shot, start it again")
    validate_losa(recipe, model)
    device = str(recipe.device)
    S = float(recipe.target_sparsity)
    kind, _, m_fixed = pattern_parts(recipe.pattern)
    rank = int(recipe.losa_rank_max)
    ignore = list(recipe.ignore or [])
    _, blocks = find_blocks(model)
    L = len(blocks)
    weights = block_param_counts(model, ignore)
    timings: dict[str, float] = {}

    if calib_ids is None:
        calib_ids = calibration_ids(tokenizer, recipe.calib_data, recipe.nsamples, recipe.seqlen, recipe.seed, model=model)
    # Training data first (it may generate text with the dense model): the whole budget, as LoSA uses over T steps.
    samples = build_train_samples(tokenizer, recipe.losa_train_data, recipe.losa_train_samples,
                                  recipe.losa_train_seqlen, recipe.seed, model=model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    bs = int(recipe.losa_batch_size)
    total_updates = num_batches(len(samples), bs)

    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    lin = prunable_linears(model, ignore)
    dense_state = {name: l.weight.detach().to("cpu", copy=True) for name, (_, l) in lin.items()}
    teacher = teacher_dtype = None
    if recipe.losa_objective == "distill":
        teacher = copy.deepcopy(model).eval()
        teacher_dtype = str(next(teacher.parameters()).dtype).replace("torch.", "")
    use_bf16 = bf16_autocast_supported(device)

    def prune_pass() -> tuple[Any, float, float]:
        """One pipeline pass to S with the recipe's allocation and pattern (rates computed on the current model)."""
        t0 = time.perf_counter()
        rates = block_rates_at(model, recipe, calib_ids, S, weights, L, progress)
        alloc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_per = mixed_n_per_block(rates, m_fixed, S, weights) if kind == "mixed" else None
        spec = PruneSpec(method=recipe.losa_mask_method, pattern=recipe.pattern, n_per_block=n_per, ignore=ignore,
                         blocksize=recipe.blocksize, percdamp=recipe.percdamp)
        res = prune_sequential(model, calib_ids, spec, rates, device=device, offload=recipe.offload,
                               dense_state=dense_state, progress=progress)
        return res, alloc_s, time.perf_counter() - t0

    # (1) prune once to S.
    first, timings["rmi_s"], timings["prune_s"] = prune_pass()
    sparsity_pruned = _weight_sparsity(lin)

    # (2) a plain LoRA (all-ones mask: the update is not masked) on every pruned linear, the whole budget.
    adapters = attach_adapters(lin, rank, recipe.losa_alpha, recipe.losa_dropout, seed=recipe.seed)
    params = list(adapters.parameters())
    opt, sched = make_optimizer(params, recipe.losa_lr, total_updates)
    try:
        t0 = time.perf_counter()
        adapters.train(True)
        losses = train_slice(model, params, batches(samples, bs, pad_id), opt, sched, objective=recipe.losa_objective,
                             teacher=teacher, device=device, autocast=use_bf16, desc="dense LoRA training",
                             progress=progress)
        adapters.train(False)
        timings["train_s"] = time.perf_counter() - t0
    finally:
        adapters.remove()  # never leave hooks on the caller's model
    del teacher

    # (3) merge W + (alpha/r) B A everywhere (the mask is all ones, so the pruned positions fill in).
    t0 = time.perf_counter()
    for name, a in adapters.adapters.items():
        if not bool(a.mask.all()):
            raise AssertionError(f"{name}: the dense-lora adapter must be unmasked")
        merge_into(adapters.linears[name].weight, a)
    timings["merge_s"] = time.perf_counter() - t0
    sparsity_merged = _weight_sparsity(lin)

    # (4) re-prune the merged model to S: the final masks; verify the zero pattern is exactly the masks.
    final, alloc_s, prune_s = prune_pass()
    timings["rmi_s"] += alloc_s
    timings["prune_s"] += prune_s
    masks: dict[str, Tensor] = {}
    kept_zero = 0
    for name, (_, l) in lin.items():
        mask = final.masks[name]
        kept_zero += check_zero_pattern(l.weight, mask, name)
        masks[name] = mask.detach().cpu().clone()
    if set(masks) != set(final.masks):
        raise AssertionError("re-prune masks do not cover exactly the pruned linears")
    realised = {n: 1.0 - float(m.float().mean()) for n, m in masks.items()}
    kept_final = sum(int(m.sum()) for m in masks.values())
    kept_both = sum(int((m & first.masks[n]).sum()) for n, m in masks.items())

    def pass_info(res: Any, name: str) -> dict[str, Any]:
        return {"pass": name, "block_rates": [float(r) for r in res.block_rates],
                "block_nm": [list(x) if x else None for x in res.block_nm],
                "recon_error": [float(e) for e in res.recon_error], "realised_sparsity": _mean_sparsity(res.masks),
                "prune_timings": res.timings, "warnings": res.warnings}

    ranks = [rank] * L
    manifest = {
        "variant": VARIANT,
        "description": "prune once, train a dense (unmasked) LoRA, merge, re-prune to the target",
        "passes": [pass_info(first, "prune"), pass_info(final, "re-prune")],
        "sparsity": {"target": S, "after_prune": sparsity_pruned, "after_merge": sparsity_merged,
                     "after_reprune": _mean_sparsity(masks),
                     # kept weights of the final masks that the first prune had kept too
                     "final_kept_also_kept_by_first_prune": kept_both / max(1, kept_final)},
        "steps_T": 1, "rank": rank, "rank_allocation": "uniform",
        "objective": recipe.losa_objective, "mask_method": recipe.losa_mask_method, "allocation": recipe.allocation,
        "train_data": recipe.losa_train_data, "train_samples": len(samples), "train_seqlen": recipe.losa_train_seqlen,
        "batch_size": bs, "optimizer": {"name": "AdamW", "lr": recipe.losa_lr, "weight_decay": 0.0, "warmup": 0.3,
                                        "schedule": "linear", "total_steps": total_updates, "max_grad_norm": 1.0},
        "alpha": recipe.losa_alpha, "dropout": recipe.losa_dropout, "adapter_form": adapters.form, "autocast": "bfloat16" if use_bf16 else None,
        "teacher_dtype": teacher_dtype, "loss_curve": losses,
        "train_loss_mean": (sum(losses) / len(losses)) if losses else None,
        "kept_weights_exactly_zero": kept_zero,
        "timings": {**timings, "total_s": time.perf_counter() - t_all},
        "zero_pattern_verified": True,
        "rates": [float(r) for r in final.block_rates], "ranks": ranks,
        "files": [],
    }
    return LosaResult(masks=masks, manifest=manifest, block_rates=[float(r) for r in final.block_rates],
                      block_ranks=ranks, block_nm=list(final.block_nm), realised=realised,
                      targets=dict(final.targets), patterns=dict(final.patterns), files={})


def _weight_sparsity(lin: dict[str, tuple[int, nn.Linear]]) -> float:
    """Fraction of exact zeros over the pruned linears' weights."""
    zeros = sum(int((l.weight == 0).sum()) for _, l in lin.values())
    total = sum(l.weight.numel() for _, l in lin.values())
    return zeros / max(1, total)
