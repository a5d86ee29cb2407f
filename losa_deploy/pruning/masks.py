"""Turning scores into keep-masks (torch.bool, True = keep, shape [out, in]).

Three structures, all compared within a row so that every output channel keeps the same number of
inputs (Wanda's finding that per-output comparison beats per-layer comparison for LLMs):

- unstructured: the layer zeroes exactly ``round(s * out * in)`` weights: every row ``floor(s * in)``, and
  the remainder one more each in the rows whose next-lowest score is lowest (so a 70% layer is 70%, not
  69.9%, and every row is within one weight of ``s * in``);
- N:M (NVIDIA convention): in every group of M consecutive inputs of a row, N are KEPT (2:4 = 50%);
- mixed N:M: a fixed M with a per-block N from the layer-wise allocation (``mixed_n_per_block``).

Ties are broken deterministically: among equal scores, the weight with the lower input index is
pruned first (a stable sort). Rankings never go through a threshold, which would over-prune when
many scores tie (e.g. already-zero weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from ..errors import UserError

# Guard for products such as 0.7 * 10 = 7.000000000000001 or 0.57 * 100 = 56.99999999999999:
# a count that is an integer up to float round-off is taken as that integer.
_EPS = 1e-9


def prune_count(sparsity: float, size: int) -> int:
    """Number of weights to zero out of ``size``: ``floor(sparsity * size)``, robust to float round-off."""
    return int(math.floor(sparsity * size + _EPS))


def check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not (0.0 <= s <= 1.0) or math.isnan(s):
        raise UserError(f"sparsity must be between 0 and 1 (got {sparsity}); e.g. 0.5 for 50%")
    return s


def check_nm(n: int, m: int) -> None:
    if m < 1 or not (0 <= n <= m):
        raise UserError(f"invalid N:M pattern {n}:{m}: need 0 <= N <= M and M >= 1")


@dataclass(frozen=True)
class Pattern:
    """Mask structure. ``kind``: "unstructured" (n = m = 0), "nm" (n kept of every m), "mixed" (m fixed, n per
    block)."""

    kind: Literal["unstructured", "nm", "mixed"]
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "mixed":
            return f"mixed:{self.m}"
        return "unstructured"

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (1 - n/m); None for unstructured and mixed."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None


def parse_pattern(text: str) -> Pattern:
    """Parse "unstructured", "N:M" (N kept of every M, e.g. "2:4") or "mixed:M" (e.g. "mixed:8")."""
    raw = str(text)
    t = raw.strip().lower().replace(" ", "")
    hint = 'use "unstructured", "N:M" with N kept of every M (e.g. "2:4"), or "mixed:M" (e.g. "mixed:8")'

    def bad(why: str = "") -> UserError:
        if why:
            return UserError(f"sparsity pattern {raw!r}: {why}; {hint}")
        return UserError(f"unknown sparsity pattern {raw!r}: {hint}")

    def number(part: str) -> int:
        try:
            return int(part)
        except ValueError:
            raise bad() from None

    if t == "unstructured":
        return Pattern("unstructured", 0, 0)
    parts = t.split(":")
    if len(parts) != 2:
        raise bad()
    a, b = parts
    m = number(b)
    if m < 1:
        raise bad("M must be a positive integer")
    if a == "mixed":
        if m < 2:
            raise UserError(f"sparsity pattern {raw!r}: mixed N:M needs M >= 2 (e.g. \"mixed:8\")")
        return Pattern("mixed", 0, m)
    n = number(a)
    if not 0 < n < m:
        raise bad("need 0 < N < M (N = kept weights of every M)")
    return Pattern("nm", n, m)


def layer_prune_count(sparsity: float, rows: int, cols: int) -> int:
    """Weights to zero in a rows x cols layer: ``s * rows * cols`` rounded half up, robust to float round-off."""
    return int(math.floor(sparsity * rows * cols + 0.5 + _EPS))


def row_prune_counts(sorted_scores: Tensor, sparsity: float) -> Tensor:
    """Per-row prune counts (int64 [rows]) summing to ``layer_prune_count``: ``floor(s * in)`` for every row,
    one more for the rows whose next candidate (column ``floor(s * in)`` of the row-sorted scores) is lowest.

    Why not floor per row alone: it loses up to one weight per row, 0.1% of a 576-wide layer, and the
    pipeline promises the target sparsity, not the nearest lower one.
    """
    rows, cols = sorted_scores.shape
    total = layer_prune_count(sparsity, rows, cols)  # <= rows * cols for sparsity <= 1
    base = total // rows
    counts = torch.full((rows,), base, dtype=torch.long, device=sorted_scores.device)
    extra = total - base * rows
    if extra > 0:
        nxt = sorted_scores[:, base]
        counts[torch.sort(nxt, stable=True).indices[:extra]] += 1
    return counts


def keep_from_counts(sorted_indices: Tensor, counts: Tensor) -> Tensor:
    """Keep-mask pruning, in every row r, the first ``counts[r]`` inputs of ``sorted_indices[r]`` (lowest first)."""
    cols = sorted_indices.shape[1]
    keep_sorted = torch.arange(cols, device=sorted_indices.device).unsqueeze(0) >= counts.unsqueeze(1)
    return torch.empty_like(keep_sorted).scatter_(1, sorted_indices, keep_sorted)


def unstructured_row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask zeroing the lowest-scoring weights of every row, ``row_prune_counts`` of them.

    Uses a stable sort (ties: lower input index pruned first), so the count is exact even when scores tie.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    s = check_sparsity(sparsity)
    rows, cols = scores.shape
    if layer_prune_count(s, rows, cols) == 0:
        return torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    srt = torch.sort(scores, dim=1, stable=True)
    return keep_from_counts(srt.indices, row_prune_counts(srt.values, s))


def nm_mask(scores: Tensor, n: int, m: int, *, name: str | None = None) -> Tensor:
    """Keep-mask keeping the ``n`` highest scores of every ``m`` consecutive inputs of each row.

    NVIDIA convention: n counts KEPT weights (2:4 = 50% sparse). Ties: the lower input index is pruned
    first, as in ``unstructured_row_mask``.
    Raises UserError (naming the layer when ``name`` is given) if in_features is not a multiple of m.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    check_nm(n, m)
    rows, cols = scores.shape
    if cols % m != 0:
        who = f"layer {name} " if name else "a layer "
        raise UserError(
            f"{who}with weight shape {rows}x{cols} cannot be pruned {n}:{m}: its {cols} inputs are not a "
            f"multiple of {m}; exclude it (ignore pattern) or pick an M that divides {cols}"
        )
    mask = torch.ones(rows, cols // m, m, dtype=torch.bool, device=scores.device)
    if n < m:
        grouped = scores.reshape(rows, cols // m, m)
        drop = torch.sort(grouped, dim=2, stable=True).indices[..., : m - n]
        mask.scatter_(2, drop, False)
    return mask.reshape(rows, cols)


def mask_from_scores(
    scores: Tensor,
    sparsity: float,
    pattern: Pattern,
    *,
    n: int | None = None,
    name: str | None = None,
) -> Tensor:
    """Keep-mask for ``scores`` under ``pattern``.

    - unstructured: ``unstructured_row_mask(scores, sparsity)``;
    - nm: ``nm_mask(scores, pattern.n, pattern.m)`` (``sparsity`` is ignored: the pattern fixes it);
    - mixed: ``nm_mask(scores, n, pattern.m)`` with the block's kept ``n`` (from ``mixed_n_per_block``);
      without ``n`` it is derived from ``sparsity`` and must be a whole number of kept weights per group.
    """
    if pattern.kind == "unstructured":
        return unstructured_row_mask(scores, sparsity)
    if pattern.kind == "nm":
        return nm_mask(scores, pattern.n, pattern.m, name=name)
    if pattern.kind == "mixed":
        if n is None:
            s = check_sparsity(sparsity)
            kept = (1.0 - s) * pattern.m
            n = int(round(kept))
            if abs(kept - n) > 1e-6:
                raise UserError(
                    f"mixed:{pattern.m} needs a whole number of kept weights per group, but a block rate of "
                    f"{s:.4f} keeps {kept:.4f} of {pattern.m}; derive per-block N with mixed_n_per_block"
                )
        return nm_mask(scores, int(n), pattern.m, name=name)
    raise ValueError(f"unknown pattern kind {pattern.kind!r}")


def _reachable_hint(num: int, m: int, target: float, total_lo: int, total_hi: int) -> str:
    """Nearest targets S' = 1 - K/(num*m) with an integer total K of kept weights per group-slot."""
    denom = num * m
    exact = (1.0 - target) * denom
    cands = sorted({min(max(math.floor(exact), total_lo), total_hi), min(max(math.ceil(exact), total_lo), total_hi)})
    return " or ".join(f"{1.0 - k / denom:.6g}" for k in cands)


_DP_MAX_STATES = 5_000_000


def _weighted_exact_n(
    vals: list[float], w: list[float], m: int, s: float, lo: int, hi: int
) -> list[int] | None:
    """Integer N_l in [lo, hi] with ``sum w_l N_l == (1 - s) m sum w`` closest to ``vals`` (weighted squares).

    Exact dynamic programme over the reachable weighted sums, after dividing the (integer) block sizes
    by their gcd. Returns None when the weights are not integers or the table would be too large (the
    caller then falls back to greedy rounding); raises UserError, with the nearest reachable targets,
    when no combination meets the budget.
    """
    import numpy as np

    if any(abs(x - round(x)) > 1e-9 * max(1.0, abs(x)) for x in w):
        return None
    wi = [int(round(x)) for x in w]
    g = 0
    for x in wi:
        g = math.gcd(g, x)
    wi = [x // g for x in wi]
    total = m * sum(wi)
    if total > _DP_MAX_STATES:
        return None
    target = (1.0 - s) * total
    INF = float("inf")
    cost = np.full(total + 1, INF)
    cost[0] = 0.0
    picks = []
    for wl, v in zip(wi, vals):
        new = np.full(total + 1, INF)
        pick = np.full(total + 1, -1, dtype=np.int16)
        for nn in range(lo, hi + 1):
            sh = wl * nn
            cand = cost[: total + 1 - sh] + wl * (nn - v) ** 2
            better = cand < new[sh:]
            new[sh:][better] = cand[better]
            pick[sh:][better] = nn
        cost = new
        picks.append(pick)
    b = int(round(target))
    if abs(target - b) > 1e-6 or not math.isfinite(cost[b]):
        reach = np.flatnonzero(np.isfinite(cost))
        below = reach[reach <= target]
        above = reach[reach >= target]
        near = sorted({int(x) for x in ([below.max()] if below.size else []) + ([above.min()] if above.size else [])})
        hint = " or ".join(f"{1.0 - k / total:.6g}" for k in near)
        raise UserError(
            f"mixed:{m} cannot reach exactly {s:.6g} sparsity with these block sizes; nearest reachable targets: "
            f"{hint}"
        )
    ns = []
    for pick, wl in zip(reversed(picks), reversed(wi)):
        nn = int(pick[b])
        ns.append(nn)
        b -= wl * nn
    assert b == 0
    return ns[::-1]


def mixed_n_per_block(
    rates: Sequence[float],
    m: int,
    target_sparsity: float,
    weights: Sequence[float] | None = None,
    *,
    min_n: int = 1,
    max_n: int | None = None,
) -> list[int]:
    """Per-block kept N (integers in [min_n, max_n], default [1, m]) for mixed N:M.

    The ideal kept count of block l is ``(1 - rates[l]) * m``. It is shifted by one common amount so that,
    after clipping to [min_n, max_n], the (weighted) mean density is exactly ``1 - target_sparsity``
    (the rates themselves may have a slightly different mean), then rounded by largest remainder:
    floor every block and hand the missing units to the largest fractional parts (ties: earlier blocks
    first, i.e. earlier blocks stay denser, as the ATP depth argument suggests).

    With equal weights the target is reachable only if ``L * m * (1 - S)`` is an integer; otherwise a
    UserError lists the nearest reachable targets. With unequal (integer) weights such as parameter
    counts, an exact dynamic programme finds the integer N closest to the shifted ideal (weighted squared
    distance) that meets the budget exactly, or a UserError lists the nearest reachable targets.
    """
    L = len(rates)
    lo, hi = _mixed_bounds(L, m, min_n, max_n)
    s = check_sparsity(target_sparsity)
    w = [1.0] * L if weights is None else [float(x) for x in weights]
    if len(w) != L or any(x <= 0 for x in w):
        raise ValueError("weights must be positive, one per block")
    equal = max(w) - min(w) <= 1e-12 * max(w)
    wsum = math.fsum(w)
    budget = (1.0 - s) * m * wsum  # target sum of w_l * N_l
    _check_mixed_reachable(L, m, s, lo, hi, wsum, budget, equal)
    vals = _shifted_ideal(rates, m, w, lo, hi, budget)
    if equal:
        ns = _largest_remainder(vals, w, lo, hi, budget)
    else:
        exact = _weighted_exact_n(vals, w, m, s, lo, hi)
        if exact is not None:
            return exact
        ns = _greedy_weighted(vals, w, lo, hi, budget, wsum)
    achieved = math.fsum(wi * n for wi, n in zip(w, ns))
    if abs(achieved - budget) > 1e-9 * wsum:
        raise UserError(
            f"mixed:{m} cannot reach exactly {s:.6g} sparsity with these block sizes (closest found: "
            f"{1 - achieved / (m * wsum):.6g}); choose a target that whole numbers of kept weights per block can meet"
        )
    return ns


def _mixed_bounds(num_blocks: int, m: int, min_n: int, max_n: int | None) -> tuple[int, int]:
    if num_blocks == 0:
        raise UserError("mixed N:M needs at least one block")
    if m < 1:
        raise UserError(f"mixed N:M needs M >= 1 (got {m})")
    hi = m if max_n is None else int(max_n)
    lo = int(min_n)
    if not (0 <= lo <= hi <= m):
        raise UserError(f"mixed N:M bounds must satisfy 0 <= min_n <= max_n <= M={m} (got {lo}, {hi})")
    return lo, hi


def _check_mixed_reachable(L: int, m: int, s: float, lo: int, hi: int, wsum: float, budget: float,
                           equal: bool) -> None:
    """UserError when no choice of N in [lo, hi] can meet the budget (with the nearest reachable targets)."""
    if budget < lo * wsum - 1e-9 * wsum or budget > hi * wsum + 1e-9 * wsum:
        raise UserError(
            f"mixed:{m} cannot reach {s:.4g} sparsity with every block keeping between {lo} and {hi} of {m}: "
            f"the reachable range is {1 - hi / m:.4g} to {1 - lo / m:.4g}"
        )
    if equal:
        total = (1.0 - s) * m * L
        if abs(total - round(total)) > 1e-6:
            raise UserError(
                f"mixed:{m} over {L} blocks cannot average exactly {s:.6g} sparsity: {L}*{m}*(1-{s:.6g}) = "
                f"{total:.6g} kept weights per group-slot must be a whole number; nearest reachable targets: "
                f"{_reachable_hint(L, m, s, lo * L, hi * L)}"
            )


def _shifted_ideal(rates: Sequence[float], m: int, w: list[float], lo: int, hi: int, budget: float) -> list[float]:
    """The ideal kept counts moved by one common shift t so that, clipped to [lo, hi], they meet the budget."""
    ideal = [(1.0 - float(r)) * m for r in rates]

    def clipped_sum(t: float) -> float:
        return math.fsum(wi * min(max(x + t, lo), hi) for wi, x in zip(w, ideal))

    a, b = -float(m) - 1.0, float(m) + 1.0  # monotone in t: bisection
    for _ in range(200):
        mid = 0.5 * (a + b)
        if clipped_sum(mid) < budget:
            a = mid
        else:
            b = mid
    return [min(max(x + b, lo), hi) for x in ideal]


def _floors_and_order(vals: list[float], lo: int, hi: int) -> tuple[list[int], list[int]]:
    """Every value floored into [lo, hi], and the blocks by largest remainder first (ties: earlier first)."""
    floors = [min(max(int(math.floor(v + 1e-9)), lo), hi) for v in vals]
    rema = [v - f for v, f in zip(vals, floors)]
    return floors, sorted(range(len(vals)), key=lambda i: (-round(rema[i], 9), i))


def _largest_remainder(vals: list[float], w: list[float], lo: int, hi: int, budget: float) -> list[int]:
    """Equal weights: floor, then one more kept weight for the largest remainders until the budget is met."""
    ns, order = _floors_and_order(vals, lo, hi)
    need = int(round((budget - math.fsum(w[i] * ns[i] for i in range(len(ns)))) / w[0]))
    # Then (cannot normally happen) any remaining units wherever there is room.
    for i in order + list(range(len(ns))):
        if need <= 0:
            break
        if ns[i] < hi:
            ns[i] += 1
            need -= 1
    return ns


def _greedy_weighted(vals: list[float], w: list[float], lo: int, hi: int, budget: float, wsum: float) -> list[int]:
    """Unequal weights the exact programme could not take: largest remainders first while the budget allows."""
    ns, order = _floors_and_order(vals, lo, hi)
    remaining = budget - math.fsum(w[i] * ns[i] for i in range(len(ns)))
    for i in order:
        if remaining <= 1e-9 * wsum:
            break
        if ns[i] < hi and w[i] <= remaining + 1e-9 * wsum:
            ns[i] += 1
            remaining -= w[i]
    return ns
