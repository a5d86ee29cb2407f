"""Per-block adapter ranks from reconstruction errors (METHODS §4), with exact rounding.

`r_l = L * Omega * e_l / sum(e)` clipped to [r_min, r_max] and rounded so the ranks are integers whose
mean is exactly Omega. The reference rounds each rank on its own (so the mean drifts from Omega) and
clips at a cap larger than the allocated adapter (so ranks above 8 silently become 8). Here the real
values are first clipped with the clipped mass redistributed (water-filling), then rounded by largest
remainder, which keeps the integer total exactly L * Omega whenever that total is an integer.
"""

from __future__ import annotations

import math
from typing import Sequence

from ...errors import UserError


def _clip_redistribute(ideal: Sequence[float], total: float, lo: float, hi: float) -> list[float]:
    """Real-valued x with lo <= x <= hi, sum(x) = total, x proportional to `ideal` on the unclipped set.

    Fixed-point water-filling: clip, then rescale the free entries to absorb what clipping added or removed.
    """
    n = len(ideal)
    x = [float(v) for v in ideal]
    fixed: dict[int, float] = {}
    for _ in range(2 * n + 2):
        free = [i for i in range(n) if i not in fixed]
        rest = total - sum(fixed.values())
        base = sum(ideal[i] for i in free)
        for i in free:
            x[i] = rest * ideal[i] / base if base > 0 else rest / len(free)
        changed = False
        for i in free:
            if x[i] > hi:
                fixed[i] = hi
                changed = True
            elif x[i] < lo:
                fixed[i] = lo
                changed = True
        if not changed:
            break
        if len(fixed) == n:
            break
    for i, v in fixed.items():
        x[i] = v
    return x


def allocate_ranks(errors: Sequence[float], mean_rank: float, r_max: int, r_min: int = 1) -> list[int]:
    """Integer ranks, one per block, proportional to `errors`, in [r_min, r_max], summing to round(L * mean_rank).

    `L * mean_rank` is rounded to the nearest integer total first (it is an integer for the default schedule,
    so the mean is then exactly Omega). Largest remainder: floor everything, give the leftover units to the
    largest fractional parts (ties to the larger error, then the earlier block) among blocks below the cap.
    """
    L = len(errors)
    if L == 0:
        return []
    if r_max < 1 or r_min < 1:
        raise UserError(f"rank caps must be >= 1 (got min {r_min}, max {r_max})")
    if r_min > r_max:
        raise UserError(f"minimum rank {r_min} exceeds the rank cap {r_max}")
    if not r_min <= mean_rank <= r_max:
        raise UserError(f"average rank {mean_rank:g} must lie within [{r_min}, {r_max}] (the rank cap)")
    errs = [float(e) for e in errors]
    if any(math.isnan(e) or e < 0 for e in errs):
        raise ValueError(f"reconstruction errors must be finite and >= 0: {errs}")
    total = int(round(L * mean_rank))
    total = min(max(total, L * r_min), L * r_max)
    if sum(errs) <= 0:
        errs = [1.0] * L
    real = _clip_redistribute(errs, float(total), float(r_min), float(r_max))
    ranks = [min(max(int(math.floor(v + 1e-9)), r_min), r_max) for v in real]
    left = total - sum(ranks)
    order = sorted(range(L), key=lambda i: (-(real[i] - math.floor(real[i] + 1e-9)), -errs[i], i))
    while left > 0:
        progressed = False
        for i in order:
            if left == 0:
                break
            if ranks[i] < r_max:
                ranks[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    while left < 0:  # only from the r_min floor clamp; take from the largest fractional deficits
        progressed = False
        for i in reversed(order):
            if left == 0:
                break
            if ranks[i] > r_min:
                ranks[i] -= 1
                left += 1
                progressed = True
        if not progressed:
            break
    assert sum(ranks) == total and all(r_min <= r <= r_max for r in ranks), (ranks, total)
    return ranks


def uniform_ranks(num_blocks: int, mean_rank: float, r_max: int, r_min: int = 1) -> list[int]:
    """Ablation: the same rank for every block (exact mean Omega by largest remainder when it is fractional)."""
    return allocate_ranks([1.0] * num_blocks, mean_rank, r_max, r_min)
