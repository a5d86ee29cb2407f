"""Pruning on the block walk: each block, fed the outputs of the already-pruned blocks before it, gets its masks.

`PruneSpec` says what to do to every block (score method, `Pattern`, per-block N for mixed:M, ignores);
`prune_sequential` does it and returns a `PruneResult` with the masks and what they realise. Every mask is
checked against its target before it is accepted (`check_realised`): a miss is a bug, never silently kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..allocation import linear_kind, linear_rates
from ..console import err
from ..model_parts import block_prefix, find_blocks, find_linears
from ..pruning.masks import Pattern, layer_prune_count, mask_from_scores
from ..pruning.scores import magnitude_scores, wanda_scores
from .sequential import _progress, _Stats, gather_stats, run_block, walk_blocks

SCORE_METHODS = ("magnitude", "wanda", "sparsegpt")
BlockHook = Callable[[int, nn.Module, dict[str, Tensor]], None]


class RealisedSparsityError(RuntimeError):
    """A pruned linear does not have the sparsity it was asked for: a bug, never silently accepted."""


@dataclass
class PruneSpec:
    """What the pipeline does to each block: score method, mask structure, per-block N (mixed), ignores."""

    method: str = "wanda"  # magnitude | wanda | sparsegpt
    pattern: Pattern = Pattern("unstructured")
    n_per_block: Sequence[int] | None = None  # mixed:M only: kept N of M for each block
    ignore: Sequence[str] = ()
    blocksize: int = 128
    percdamp: float = 0.01
    # Sparsity offsets by linear kind inside each block (unstructured only); the other linears restore the
    # block's rate (`allocation.linear_rates`).
    type_offsets: Mapping[str, float] = field(default_factory=dict)

    def block_target(self, index: int, rate: float) -> tuple[float, int, int]:
        """(target sparsity, n, m) of block `index`; n = m = 0 for unstructured."""
        p = self.pattern
        if p.kind == "nm":
            return 1.0 - p.n / p.m, p.n, p.m
        if p.kind == "mixed":
            if self.n_per_block is None:
                raise ValueError("mixed pattern needs n_per_block")
            n_i = int(self.n_per_block[index])
            return 1.0 - n_i / p.m, n_i, p.m
        return float(rate), 0, 0


@dataclass
class PruneResult:
    """What a sequential prune did. Masks are bool (True = keep) on CPU, keyed by full weight name."""

    masks: dict[str, Tensor] = field(default_factory=dict)
    realised: dict[str, float] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    patterns: dict[str, str] = field(default_factory=dict)
    block_rates: list[float] = field(default_factory=list)
    block_nm: list[tuple[int, int] | None] = field(default_factory=list)
    recon_error: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    sparsegpt_info: dict[str, dict] = field(default_factory=dict)


def check_realised(name: str, weight: Tensor, mask: Tensor, target: float, n: int, m: int) -> float:
    """Realised sparsity of a pruned linear; raises RealisedSparsityError if it misses its target.

    Unstructured: every row within one weight of target*in, the layer exactly round(target*out*in).
    N:M: every group of m inputs keeps exactly n. In both cases the weight is exactly 0 wherever the mask is.
    """
    rows, cols = mask.shape
    if bool((weight.detach()[~mask.to(weight.device)] != 0).any()):
        raise RealisedSparsityError(f"{name}: weights outside the mask are not zero")
    if m:
        kept = mask.reshape(rows, cols // m, m).sum(dim=-1)
        if not bool((kept == n).all()):
            raise RealisedSparsityError(f"{name}: not every group of {m} keeps exactly {n}")
    else:
        pruned_per_row = (~mask).sum(dim=1).float()
        if bool(((pruned_per_row - target * cols).abs() > 1.0 + 1e-6).any()):
            raise RealisedSparsityError(f"{name}: a row's pruned count is not within one of {target:.4f}*{cols}; "
                                        f"realised {float(pruned_per_row.mean()) / cols:.4f}")
        pruned, needed = int(pruned_per_row.sum()), layer_prune_count(target, rows, cols)
        if pruned != needed:
            raise RealisedSparsityError(f"{name}: {pruned} weights pruned, the target {target:.4f} needs {needed}")
    return 1.0 - float(mask.float().mean())


def recon_error(dense_out: Tensor, pruned_out: Tensor) -> float:
    """METHODS §4: per output channel, ||dense - pruned|| / ||dense|| over all tokens, averaged over channels."""
    d = dense_out.float().reshape(-1, dense_out.shape[-1])
    p = pruned_out.float().reshape(-1, pruned_out.shape[-1])
    num = (d - p).pow(2).sum(dim=0).sqrt()
    den = d.pow(2).sum(dim=0).sqrt().clamp_min(1e-12)
    return float((num / den).mean())


def _swap_weights(block: nn.Module, prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Put `state`'s tensors into `block` (by full name); return the displaced data to restore later."""
    saved: dict[str, Tensor] = {}
    for pname, p in block.named_parameters():
        key = prefix + pname
        if key in state:
            saved[pname] = p.data
            p.data = state[key].to(device=p.device, dtype=p.dtype)
    return saved


def _restore_weights(block: nn.Module, saved: dict[str, Tensor]) -> None:
    for pname, p in block.named_parameters():
        if pname in saved:
            p.data = saved[pname]


class _BlockPruner:
    """The visitor `prune_sequential` hands to the block walk: one block at a time, in order."""

    def __init__(self, spec: PruneSpec, rates: Sequence[float], dense_state: dict[str, Tensor] | None,
                 block_hook: BlockHook | None, dense_outputs: dict[int, Tensor] | None = None) -> None:
        self.spec, self.rates, self.dense_state, self.block_hook = spec, rates, dense_state, block_hook
        self.dense_outputs = dense_outputs
        self.res = PruneResult()
        self.dense_hidden: Tensor | None = None  # the dense model's stream, for reconstruction errors
        self.t_stats = self.t_prune = self.t_recon = 0.0

    def __call__(self, i: int, prefix: str, block: nn.Module, hidden: Tensor | None, kwargs: dict) -> Tensor | None:
        target, n, m = self.spec.block_target(i, float(self.rates[i]))
        self.res.block_rates.append(target)
        self.res.block_nm.append((n, m) if m else None)
        linears = find_linears(block, self.spec.ignore, prefix=prefix)
        dense_out = self._dense_reference(i, prefix, block, hidden, kwargs)
        stats = self._statistics(block, linears, hidden, kwargs)
        t0 = time.perf_counter()
        block_masks = {}
        per = {k: target for k in linears} if m else linear_rates(
            target, {k: lin.weight.numel() for k, lin in linears.items()}, self.spec.type_offsets)
        if i == 0:
            self._warn_unmatched_offsets(linears)
        for lname, lin in linears.items():
            full = f"{prefix}{lname}.weight"
            block_masks[full] = self._prune_linear(full, lin, stats.get(lname), per[lname], n, m)
        self.t_prune += time.perf_counter() - t0
        if self.block_hook is not None:
            self.block_hook(i, block, block_masks)
        if hidden is None:  # the data-free magnitude path: nothing flows to the next block
            return None
        t0 = time.perf_counter()
        out = run_block(block, hidden, kwargs)
        if dense_out is not None:
            self.res.recon_error.append(recon_error(dense_out, out))
        self.t_stats += time.perf_counter() - t0  # the re-run is part of the data flow cost
        return out

    def _warn_unmatched_offsets(self, linears: dict[str, nn.Linear]) -> None:
        """A type offset naming no linear of this architecture (k_proj on a fused qkv_proj) does nothing: say so."""
        kinds = {linear_kind(k) for k in linears}
        for kind in sorted(set(self.spec.type_offsets) - kinds):
            msg = f"--type-offset {kind}: no linear of that kind in the blocks ({', '.join(sorted(kinds))}); ignored"
            self.res.warnings.append(msg)
            err.print(f"[yellow]warning:[/yellow] {msg}", highlight=False)

    def _dense_reference(self, i: int, prefix: str, block: nn.Module, hidden: Tensor | None,
                         kwargs: dict) -> Tensor | None:
        """The dense block on the dense stream (for LoSA's reconstruction error), from `dense_outputs` when it
        already holds block i; None without `dense_state`."""
        if self.dense_state is None:
            return None
        t0 = time.perf_counter()
        cache = self.dense_outputs
        if cache is not None and i in cache:
            dense_out = cache[i]
        else:
            dh = self.dense_hidden if self.dense_hidden is not None else hidden
            if i > 0 and cache is not None and i - 1 in cache:
                dh = cache[i - 1]
            saved = _swap_weights(block, prefix, self.dense_state)
            dense_out = run_block(block, dh, kwargs)
            _restore_weights(block, saved)
            self.dense_hidden = dense_out
            if cache is not None:
                cache[i] = dense_out
        self.t_recon += time.perf_counter() - t0
        return dense_out

    def _statistics(self, block: nn.Module, linears: dict[str, nn.Linear], hidden: Tensor | None,
                    kwargs: dict) -> dict[str, _Stats]:
        """Wanda's input norms or SparseGPT's Hessians from one pass of the block (magnitude needs none)."""
        method = self.spec.method
        if method == "magnitude" or not linears:
            return {}
        t0 = time.perf_counter()
        stats, _ = gather_stats(block, linears, hidden, kwargs, need_sq=method == "wanda",
                                need_h=method == "sparsegpt")
        self.t_stats += time.perf_counter() - t0
        return stats

    def _prune_linear(self, full: str, lin: nn.Linear, stats: _Stats | None, target: float, n: int, m: int) -> Tensor:
        """Mask one weight, zero it off the mask, verify; returns the mask (CPU)."""
        W = lin.weight
        if self.spec.method == "sparsegpt":
            mask = self._sparsegpt(full, W, stats, target, n, m)
        else:
            scores = magnitude_scores(W.data) if self.spec.method == "magnitude" else wanda_scores(W.data, stats.sq)
            mask = mask_from_scores(scores, target, self.spec.pattern, n=n or None, name=full)
        mask = mask.to(W.device)
        W.data.mul_(mask.to(W.dtype))
        res = self.res
        res.realised[full] = check_realised(full, W.data, mask, target, n, m)
        res.targets[full] = target
        res.patterns[full] = f"{n}:{m}" if m else "unstructured"
        res.masks[full] = mask.cpu()
        return res.masks[full]

    def _sparsegpt(self, full: str, W: nn.Parameter, stats: _Stats | None, target: float, n: int, m: int) -> Tensor:
        """SparseGPT's mask and error-compensated weights (written into W); retries are reported by name."""
        from ..pruning import sparsegpt  # looked up at call time: tests substitute a flaky solver

        new_w, mask, info = sparsegpt.sparsegpt_prune(W.data, stats.H, target, n=n, m=m, blocksize=self.spec.blocksize,
                                                      percdamp=self.spec.percdamp, name=full)
        self.res.sparsegpt_info[full] = {k: v for k, v in info.items() if isinstance(v, (int, float))}
        if info.get("damping_retries", 0):
            msg = (f"SparseGPT: Cholesky failed on {full}; retried {info['damping_retries']} time(s), "
                   f"final damping {info.get('damp', float('nan')):.3g} x mean diag(H)")
            self.res.warnings.append(msg)
            err.print(f"[yellow]warning:[/yellow] {msg}", highlight=False)
        W.data.copy_(new_w.to(W.dtype))
        return mask

    def timings(self, walk: dict[str, float]) -> dict[str, float]:
        return {"capture_s": walk["capture_s"], "forward_s": self.t_stats, "prune_s": self.t_prune,
                "dense_reference_s": self.t_recon, "total_s": walk["total_s"]}


def _check_spec(spec: PruneSpec, rates: Sequence[float], num_blocks: int) -> None:
    if spec.method not in SCORE_METHODS:
        raise ValueError(f"prune_sequential: unknown method {spec.method!r}")
    if len(rates) != num_blocks:
        raise ValueError(f"{len(rates)} rates for {num_blocks} blocks")
    if spec.pattern.kind == "mixed" and (spec.n_per_block is None or len(spec.n_per_block) != num_blocks):
        raise ValueError("mixed pattern needs one N per block")


def _prune_without_data(model: nn.Module, pruner: _BlockPruner, progress: bool) -> PruneResult:
    """Magnitude masks do not depend on the inputs, so no block needs to run: prune them in place, no data."""
    t0 = time.perf_counter()
    blocks_name, blocks = find_blocks(model)
    desc = f"pruning ({pruner.spec.method})"
    with _progress(desc, len(blocks), progress) as prog:
        task = prog.add_task(desc, total=len(blocks))
        for i, blk in enumerate(blocks):
            pruner(i, block_prefix(blocks_name, i), blk, None, {})
            prog.update(task, advance=1)
    walk = {"capture_s": 0.0, "total_s": time.perf_counter() - t0}
    pruner.t_stats = pruner.t_recon = 0.0
    pruner.res.timings = pruner.timings(walk)
    return pruner.res


@torch.no_grad()
def prune_sequential(
    model: nn.Module,
    calib_ids: Tensor | None,
    spec: PruneSpec,
    rates: Sequence[float],
    *,
    device: Any = "cpu",
    offload: bool = False,
    dense_state: dict[str, Tensor] | None = None,
    block_hook: BlockHook | None = None,
    progress: bool = True,
    dense_outputs: dict[int, Tensor] | None = None,
) -> PruneResult:
    """Prune every block in order, feeding each the outputs of the already-pruned blocks before it.

    `rates`: one target sparsity per block (ignored for fixed N:M; for mixed:M, `spec.n_per_block` decides).
    `dense_state` ({full param name: tensor}): also record each block's reconstruction error (dense block on
    dense inputs vs pruned block on pruned inputs), for LoSA's rank allocation.
    `block_hook(index, block, {full weight name: mask})` runs after each block is pruned.
    `dense_outputs`: a cache of the dense blocks' outputs on `calib_ids`, filled on the first call and read on
    later ones (LoSA prunes T times with the same dense weights and calibration, so the reference is the same).
    Magnitude without `dense_state` reads no data (`calib_ids` may be None) and runs no block.
    """
    _check_spec(spec, rates, len(find_blocks(model)[1]))
    pruner = _BlockPruner(spec, rates, dense_state, block_hook, dense_outputs)
    if spec.method == "magnitude" and dense_state is None:
        return _prune_without_data(model, pruner, progress)
    if calib_ids is None:
        raise ValueError(f"prune_sequential: {spec.method} needs calibration ids")
    walk = walk_blocks(model, calib_ids, pruner, device=device, offload=offload, progress=progress,
                       desc=f"pruning ({spec.method})")
    pruner.res.timings = pruner.timings(walk)
    return pruner.res
