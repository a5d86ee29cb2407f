"""ATP's beta chosen by perplexity on held-out text (`--allocation atp` without a numeric `--atp-beta`).

Fast proxy: one dense pass collects Wanda statistics, then for each beta the masks are applied to the dense
weights (no sequential re-calibration) and the tuning perplexity measured; the real prune follows with the chosen
beta. The grid avoids the range's endpoints (beta = max would make the last block 100% sparse at S >= 0.5).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..allocation import atp_beta_range, atp_rates
from ..console import err
from ..errors import UserError
from ..evaluation.perplexity import perplexity
from ..model_parts import find_blocks, prunable_linears
from ..pruning.masks import mask_from_scores, mixed_n_per_block
from ..pruning.scores import magnitude_scores, wanda_scores
from .recipe import Recipe
from .sequential import collect_wanda_stats


def one_buffer_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of `tensors` as views of one buffer per (device, dtype): one allocation, returned whole when freed.

    Per-layer clones (hundreds of small allocations) stay in the allocator's heap after they are freed, which
    raised the peak RSS of the prune that follows; one large buffer is unmapped as soon as it is released.
    """
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


def _dense_input_norms(model: Any, calib_ids: torch.Tensor, recipe: Recipe, device: str,
                       progress: bool) -> dict[str, torch.Tensor] | None:
    """Wanda's statistics from one dense pass (None for magnitude, whose scores read no data)."""
    if recipe.method == "magnitude":
        return None
    return collect_wanda_stats(model, calib_ids, ignore=recipe.prune.ignore, device=device, offload=recipe.offload,
                               progress=progress, desc="ATP: dense statistics")


def _score(dense: torch.Tensor, sq: torch.Tensor | None) -> torch.Tensor:
    """Recomputed per beta: caching every layer's fp32 scores doubles peak memory."""
    return magnitude_scores(dense) if sq is None else wanda_scores(dense, sq)


def _tuning_perplexity(model: Any, tune_ids: torch.Tensor, device: str, offload: bool) -> float:
    if offload:
        model.to(device)
    ppl = perplexity(model, tune_ids.reshape(-1), tune_ids.shape[1], progress=False).perplexity
    if offload:
        model.to("cpu")
    return ppl


def tune_atp_beta(
    model: Any, calib_ids: torch.Tensor, tune_ids: torch.Tensor, recipe: Recipe, weights: list[float] | None,
    device: str, progress: bool,
) -> tuple[float, dict[str, Any]]:
    """(chosen beta, the grid and its tuning perplexities for the manifest). The dense weights come back exactly."""
    t0 = time.perf_counter()
    L, S = len(find_blocks(model)[1]), recipe.target_sparsity
    pattern = recipe.prune.pattern
    _, hi = atp_beta_range(L, S)
    grid = recipe.rates.atp_grid
    betas = [hi * k / (grid + 1) for k in range(1, grid + 1)]
    sq = _dense_input_norms(model, calib_ids, recipe, device, progress)
    lins = prunable_linears(model, recipe.prune.ignore)
    dense = one_buffer_copy({k: lin.weight.data for k, (_, lin) in lins.items()})
    rows: list[dict[str, Any]] = []
    try:
        for beta in [0.0] + betas:
            rates = atp_rates(L, S, beta, weights)
            ns = mixed_n_per_block(rates, pattern.m, S, weights) if pattern.kind == "mixed" else None
            for k, (bi, lin) in lins.items():
                scores = _score(dense[k], None if sq is None else sq[k])
                mask = mask_from_scores(scores, rates[bi], pattern, n=ns[bi] if ns else None)
                lin.weight.data.copy_(dense[k]).mul_(mask.to(dense[k].dtype))
            ppl = _tuning_perplexity(model, tune_ids, device, recipe.offload)
            rows.append({"beta": beta, "tune_ppl": ppl, "candidate": beta > 0})
            note = "  (uniform, reference only)" if beta == 0 else ""
            err.print(f"[dim]ATP tuning: beta={beta:.5f}  tuning perplexity {ppl:.3f}{note}[/dim]", highlight=False)
    finally:
        for k, (_, lin) in lins.items():
            lin.weight.data.copy_(dense[k])
        del dense
    cands = [r for r in rows if r["candidate"] and math.isfinite(r["tune_ppl"])]
    if not cands:
        raise UserError("ATP tuning produced no finite perplexity; pass --atp-beta explicitly")
    best = min(cands, key=lambda r: r["tune_ppl"])
    proxy = ("magnitude masks per beta" if recipe.method == "magnitude"
             else "dense-pass Wanda statistics, masks per beta")
    return best["beta"], {"grid": rows, "chosen": best["beta"], "range": [0.0, hi],
                          "seconds": time.perf_counter() - t0, "proxy": proxy}
