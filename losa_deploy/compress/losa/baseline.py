"""The naive baseline LoSA is compared with (`compress --method dense-lora`): prune, dense LoRA, merge, re-prune.

What users try today: prune once to the target S (Wanda or SparseGPT, `--mask-method`, through the same sequential
pipeline and rate allocator as LoSA), train a plain LoRA (the update B A is *not* masked) on the same data with
the same optimiser, schedule and budget (`--train-samples`, all of it in one go), merge W + (alpha/r) B A (dense:
the sparsity is lost), then prune the merged model to S again with the same mask method and allocation. One shot
(T = 1 by construction: `--steps` and `--rank-start` do not apply); every block gets rank `--rank-end`.

No resume: the run is one shot and keeps no state in `work_dir` (`--resume` with it is a UserError).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from ..methods import MethodInputs, MethodResult, PassResult, prune_pass
from .adapter import AdapterSet, attach_adapters, check_zero_pattern, merge_into
from .setup import (TrainingSetup, calibration_or_default, mean_sparsity, optimizer_record, prepare_training,
                    training_record)
from .train import batches, make_optimizer, num_batches, train_slice

VARIANT = "dense-lora"


def run_dense_lora(inputs: MethodInputs) -> MethodResult:
    """Run the dense-LoRA baseline on `inputs.model` in place; its prunable linears end with the re-pruned
    weights. The result's manifest section has `"variant": "dense-lora"`; `work_dir` stays unused."""
    t_all = time.perf_counter()
    inputs.calib_ids = calibration_or_default(inputs)
    setup = prepare_training(inputs)  # the whole budget, as LoSA uses over T steps
    allocator = inputs.allocator()
    S = inputs.recipe.target_sparsity
    timings: dict[str, float] = {}

    def prune_to_target() -> PassResult:
        """One pass to S with the recipe's allocation and pattern (rates computed on the current model)."""
        return prune_pass(inputs, allocator, S, method=inputs.recipe.adapters.mask_method,
                          pattern=inputs.recipe.prune.pattern, dense_state=setup.dense_state)

    first = prune_to_target()  # (1) prune once to S
    sparsity_pruned = _weight_sparsity(setup.linears)
    adapters, losses, total_updates = _train_dense_lora(inputs, setup, timings)  # (2) unmasked LoRA
    t0 = time.perf_counter()
    _merge_dense(adapters)  # (3) merge everywhere: the pruned positions fill in
    timings["merge_s"] = time.perf_counter() - t0
    sparsity_merged = _weight_sparsity(setup.linears)
    final = prune_to_target()  # (4) re-prune the merged model to S: the final masks
    timings["rmi_s"] = first.allocation_s + final.allocation_s
    timings["prune_s"] = first.prune_s + final.prune_s
    masks, kept_zero = _final_masks(setup.linears, final.prune.masks)
    rank = int(inputs.recipe.adapters.rank_end)
    section = {
        "variant": VARIANT,
        "description": "prune once, train a dense (unmasked) LoRA, merge, re-prune to the target",
        "passes": [_pass_record(first, "prune"), _pass_record(final, "re-prune")],
        "sparsity": _sparsity_record(S, sparsity_pruned, sparsity_merged, masks, first.prune.masks),
        "steps_T": 1, "rank": rank, "rank_allocation": "uniform",
        **training_record(inputs, setup, adapters, optimizer_record(inputs.recipe.adapters.lr, total_updates)),
        "loss_curve": losses, "train_loss_mean": (sum(losses) / len(losses)) if losses else None,
        "kept_weights_exactly_zero": kept_zero,
        "timings": {**timings, "total_s": time.perf_counter() - t_all},
        "zero_pattern_verified": True,
        "rates": [float(r) for r in final.prune.block_rates], "ranks": [rank] * allocator.num_blocks,
        "files": [],
    }
    return _result(inputs, final, masks, section)


def _sparsity_record(target: float, after_prune: float, after_merge: float, masks: dict[str, Tensor],
                     first_masks: dict[str, Tensor]) -> dict[str, float]:
    kept_final = sum(int(m.sum()) for m in masks.values())
    kept_both = sum(int((m & first_masks[n]).sum()) for n, m in masks.items())
    return {"target": target, "after_prune": after_prune, "after_merge": after_merge,
            "after_reprune": mean_sparsity(masks),
            # kept weights of the final masks that the first prune had kept too
            "final_kept_also_kept_by_first_prune": kept_both / max(1, kept_final)}


def _result(inputs: MethodInputs, final: PassResult, masks: dict[str, Tensor],
            section: dict[str, Any]) -> MethodResult:
    res = final.prune
    return MethodResult(
        masks=masks, targets=dict(res.targets), block_rates=[float(r) for r in res.block_rates],
        block_nm=list(res.block_nm), realised={n: 1.0 - float(m.float().mean()) for n, m in masks.items()},
        patterns=dict(res.patterns), block_ranks=list(section["ranks"]),
        allocation={"method": f"{inputs.recipe.rates.allocation} ({VARIANT})"},
        timings={"losa_s": section["timings"]["total_s"]}, section=section)


def _train_dense_lora(inputs: MethodInputs, setup: TrainingSetup,
                      timings: dict[str, float]) -> tuple[AdapterSet, list[float], int]:
    """A plain LoRA (all-ones mask: the update is not masked) on every pruned linear, the whole budget in one go."""
    a = inputs.recipe.adapters
    total_updates = num_batches(len(setup.samples), a.batch_size)
    adapters = attach_adapters(setup.linears, int(a.rank_end), a.lora_alpha, a.lora_dropout,
                               seed=inputs.recipe.calibration.seed)
    params = list(adapters.parameters())
    opt, sched = make_optimizer(params, a.lr, total_updates)
    try:
        t0 = time.perf_counter()
        with adapters.training(torch.bfloat16 if setup.use_bf16 else None):
            losses = train_slice(inputs.model, params, batches(setup.samples, a.batch_size, setup.pad_id), opt,
                                 sched, objective=a.objective, teacher=setup.teacher, device=inputs.device,
                                 autocast=setup.use_bf16, desc="dense LoRA training", progress=inputs.progress)
        timings["train_s"] = time.perf_counter() - t0
    finally:
        adapters.remove()  # never leave hooks on the caller's model
    setup.teacher = None  # its memory is not needed for the re-prune
    return adapters, losses, total_updates


def _merge_dense(adapters: AdapterSet) -> None:
    """W + (alpha/r) B A everywhere (the mask is all ones, so the pruned positions fill in)."""
    for name, a in adapters.adapters.items():
        if not bool(a.mask.all()):
            raise AssertionError(f"{name}: the dense-lora adapter must be unmasked")
        merge_into(adapters.linears[name].weight, a)


def _final_masks(linears: dict[str, tuple[int, nn.Linear]],
                 pruned: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """The re-prune's masks, after verifying that the zero pattern is exactly them."""
    masks: dict[str, Tensor] = {}
    kept_zero = 0
    for name, (_, layer) in linears.items():
        kept_zero += check_zero_pattern(layer.weight, pruned[name], name)
        masks[name] = pruned[name].detach().cpu().clone()
    if set(masks) != set(pruned):
        raise AssertionError("re-prune masks do not cover exactly the pruned linears")
    return masks, kept_zero


def _pass_record(done: PassResult, name: str) -> dict[str, Any]:
    res = done.prune
    return {"pass": name, "block_rates": [float(r) for r in res.block_rates],
            "block_nm": [list(x) if x else None for x in res.block_nm],
            "recon_error": [float(e) for e in res.recon_error], "realised_sparsity": mean_sparsity(res.masks),
            "prune_timings": res.timings, "warnings": res.warnings}


def _weight_sparsity(lin: dict[str, tuple[int, nn.Linear]]) -> float:
    """Fraction of exact zeros over the pruned linears' weights."""
    zeros = sum(int((layer.weight == 0).sum()) for _, layer in lin.values())
    total = sum(layer.weight.numel() for _, layer in lin.values())
    return zeros / max(1, total)
