"""Checks that need more than the recipe: room for the output before loading, the model's shapes after.

They complete `Recipe.validate` (which needs nothing but the settings) and run before the first expensive step,
so a mistake costs seconds and leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..allocation import atp_beta_range, atp_rates
from ..artifact import check_output_room, checkpoint_bytes
from ..errors import UserError
from ..model_parts import find_blocks, prunable_linears, require_linear_blocks
from ..models import resolve_model
from .recipe import TEACHER_OBJECTIVES, Recipe


def check_room(recipe: Recipe, out: Path) -> None:
    """Before the model is loaded: `out` writable, and about enough free space for the checkpoint it will hold
    (weights at --dtype, one mask byte per weight, and for LoSA its step checkpoint beside it)."""
    check_output_room(out, 0)  # writable, before an alias's first dequantisation
    src = resolve_model(recipe.model)
    if src.is_local:
        value_bytes = 4 if recipe.dtype == "float32" else 2
        params = checkpoint_bytes(src.path, 1)
        need = params * (value_bytes + 1) + 16 * 2**20  # + tokenizer and config, generously
        if recipe.trains_adapters:
            need += params * 5  # losa_state.pt: fp32 prunable weights and their masks (adapters are small)
        check_output_room(out, need)


def check_against_model(model: nn.Module, recipe: Recipe, device: str) -> None:
    """Something to prune, N:M divides every pruned layer, ATP's beta in range, room for a distillation teacher."""
    require_linear_blocks(model)
    lins = prunable_linears(model, recipe.prune.ignore)
    if not lins:
        raise UserError("no linear layer left to prune: --ignore excludes all of them")
    pattern = recipe.prune.pattern
    for name, (_, lin) in lins.items():
        if pattern.m and lin.in_features % pattern.m:
            raise UserError(f"pattern {pattern}: layer {name} has {lin.in_features} inputs, not a multiple of "
                            f"{pattern.m}; exclude it with --ignore '{name}' or choose another M")
    beta = recipe.rates.atp_beta
    if recipe.rates.allocation == "atp" and isinstance(beta, float):
        L, S = len(find_blocks(model)[1]), recipe.target_sparsity
        _, hi = atp_beta_range(L, S)
        if not 0 < beta <= hi:
            raise UserError(f"--atp-beta {beta} is out of range for {L} blocks at sparsity {S:g}: "
                            f"use 0 < beta <= {hi:.6g} (or 'auto')")
        atp_rates(L, S, beta)  # also rejects a 100%-sparse last block
    if recipe.trains_adapters and recipe.adapters.objective in TEACHER_OBJECTIVES:
        check_teacher_room(model, device, recipe.adapters.objective)
    if recipe.trains_adapters:
        from .losa.head_loss import head_kernel

        head_kernel()  # a bad LOSA_DEPLOY_HEAD_KERNEL is refused before any data is generated


def teacher_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def check_teacher_room(model: nn.Module, device: str, objective: str) -> None:
    """Distillation keeps a frozen copy of the dense model: refuse up front when the device cannot hold it."""
    need = teacher_bytes(model)
    dev = torch.device(device)
    free: Any
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
    else:
        import psutil

        free = psutil.virtual_memory().available
    # The copy itself plus headroom for its activations and the student's training memory.
    if need * 1.5 > free:
        raise UserError(
            f"--objective {objective} needs room for a dense teacher copy ({need / 2**30:.2f} GiB) on {device} "
            f"but only {free / 2**30:.2f} GiB is free; use --objective lm"
        )
