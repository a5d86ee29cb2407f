"""Layer-wise sparsity allocation: one rate per decoder block, (weighted) mean exactly the target S.

Methods (docs METHODS.md section 3): uniform, ATP (arithmetic progression over depth), OWL (outlier
ratio of Wanda scores) and RMI (LoSA's representation mutual information via linear CKA, solved as an
exact box-constrained LP). Every function here is pure: statistics in, python floats out.

``weights`` (optional, one per block, e.g. parameter counts) turns "mean" into the weighted mean
``sum(w_l * s_l) / sum(w_l)``, so that the model's overall sparsity is S when blocks differ in size.
All returned rates lie in [0, 1) and their (weighted) mean equals S to 1e-12.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .errors import UserError
from .pruning.masks import layer_prune_count

_MEAN_TOL = 1e-12


def _check_target(sparsity: float) -> float:
    s = float(sparsity)
    if math.isnan(s) or not (0.0 <= s < 1.0):
        raise UserError(f"target sparsity must be in [0, 1) (got {sparsity}); e.g. 0.7 for 70%")
    return s


def _check_blocks(num_blocks: int) -> None:
    if num_blocks < 1:
        raise UserError("the model has no decoder blocks to prune")


def _weights(num: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * num
    w = [float(x) for x in weights]
    if len(w) != num:
        raise ValueError(f"got {len(w)} weights for {num} blocks")
    if any(not (x > 0) or math.isinf(x) for x in w):
        raise ValueError("block weights must be positive and finite")
    return w


def weighted_mean(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """sum(w * v) / sum(w) with exactly rounded sums (math.fsum)."""
    w = _weights(len(values), weights)
    return math.fsum(wi * v for wi, v in zip(w, values)) / math.fsum(w)


def _finalise(rates: Sequence[float], target: float, weights: Sequence[float] | None, what: str) -> list[float]:
    """Remove float round-off from the mean by a common shift, then check [0, 1) and the mean."""
    r = [float(x) for x in rates]
    for _ in range(3):
        diff = target - weighted_mean(r, weights)
        if diff == 0.0:
            break
        r = [x + diff for x in r]
    err = abs(weighted_mean(r, weights) - target)
    assert err <= _MEAN_TOL, f"{what}: mean {weighted_mean(r, weights)!r} misses target {target!r}"
    # Round-off can leave -1e-17 at a bound of 0: snap it, it does not move the mean beyond tolerance.
    r = [0.0 if -1e-12 < x < 0.0 else x for x in r]
    if any(x < 0.0 or x >= 1.0 or math.isnan(x) for x in r):
        raise UserError(f"{what} gives block rates outside [0, 1): {[round(x, 4) for x in r]}")
    return r


# ----------------------------------------------------------------------------------------- uniform
def uniform_rates(num_blocks: int, sparsity: float, weights: Sequence[float] | None = None) -> list[float]:
    """Every block at S (the weighted mean is S for any weights)."""
    _check_blocks(num_blocks)
    s = _check_target(sparsity)
    _weights(num_blocks, weights)
    return [s] * num_blocks


# --------------------------------------------------------------------------------------------- ATP
def atp_beta_range(num_blocks: int, sparsity: float) -> tuple[float, float]:
    """Legal ATP step range ``(0, min(S, 1-S) * 2 / (L-1))``; (0, 0) for a single block.

    At the upper end the first block is at max(0, 2S-1) and the last at min(2S, 1); when S >= 0.5 the
    last block would be 100% sparse, so ``atp_rates`` then requires beta strictly below the maximum.
    """
    s = _check_target(sparsity)
    _check_blocks(num_blocks)
    if num_blocks == 1:
        return (0.0, 0.0)
    return (0.0, min(s, 1.0 - s) * 2.0 / (num_blocks - 1))


def atp_rates(
    num_blocks: int, sparsity: float, beta: float, weights: Sequence[float] | None = None
) -> list[float]:
    """ATP rates ``s_i = S - beta (L-1)/2 + beta (i-1)``, i = 1..L: sparser with depth.

    ``beta = 0`` is allowed and gives uniform rates (the grid search's natural starting point).
    UserError, stating the legal range, when beta < 0 or beta > min(S, 1-S) * 2/(L-1), or when a rate
    would reach 100% (beta at the maximum with S >= 0.5). With ``weights`` the progression is shifted so
    the weighted mean is S.
    """
    L = num_blocks
    lo, hi = atp_beta_range(L, sparsity)
    s = float(sparsity)
    b = float(beta)
    tol = 1e-12
    if math.isnan(b) or b < -tol or b > hi + tol:
        raise UserError(
            f"ATP beta {beta} is out of range for {L} blocks at sparsity {s:g}: use 0 <= beta <= {hi:.6g}"
        )
    b = min(max(b, 0.0), hi)
    centre = (L + 1) / 2.0
    rates = [s + b * (i - centre) for i in range(1, L + 1)]
    if weights is not None:
        shift = s - weighted_mean(rates, weights)
        rates = [x + shift for x in rates]
    if max(rates) >= 1.0 - 1e-12 or min(rates) < -1e-12:
        raise UserError(
            f"ATP beta {beta} gives block rates outside [0, 1) for {L} blocks at sparsity {s:g}: "
            f"use 0 <= beta < {hi:.6g}"
        )
    return _finalise(rates, s, weights, f"ATP (beta={beta})")


# --------------------------------------------------------------------------------------------- OWL
def owl_outlier_ratio(scores: Tensor | Sequence[Tensor], m: float = 5.0) -> float:
    """Share of scores above ``m`` x their mean (OWL's layer outlier ratio), as a fraction in [0, 1].

    ``scores``: a block's Wanda scores, either one tensor or a list of per-linear tensors (they are
    pooled, as the OWL reference concatenates a block's flattened scores). The OWL paper prints it as a
    percentage; the mapping in ``owl_rates`` is invariant to that scale.
    """
    parts = [scores] if isinstance(scores, Tensor) else list(scores)
    if not parts or sum(p.numel() for p in parts) == 0:
        raise ValueError("owl_outlier_ratio needs at least one score")
    total = sum(p.numel() for p in parts)
    ssum = sum(torch.sum(p.detach(), dtype=torch.float64).item() for p in parts)
    thresh = float(m) * ssum / total
    above = sum(_count_above(p, thresh) for p in parts)
    return above / total


def _count_above(p: Tensor, thresh: float) -> int:
    """Count entries above ``thresh`` chunk-wise (avoids a float64 copy of a huge score tensor)."""
    flat = p.detach().reshape(-1)
    out = 0
    for i in range(0, flat.numel(), 2**22):
        out += int((flat[i : i + 2**22].double() > thresh).sum())
    return out


def owl_rates(
    outlier_ratios: Sequence[float],
    sparsity: float,
    lam: float = 0.08,
    weights: Sequence[float] | None = None,
) -> list[float]:
    """OWL rates as the reference computes them: more outliers -> denser block.

    ``a_l = (r_l - min r) / (max r - min r) * 2 lam`` (linear map onto [0, 2 lam]),
    density ``d_l = 1 - S + (a_l - mean(a))`` (re-centred), rate ``= 1 - d_l``; mean rate exactly S.
    Equal ratios give uniform rates. UserError if a rate would leave [0, 1) (lower ``lam``).
    """
    s = _check_target(sparsity)
    r = [float(x) for x in outlier_ratios]
    _check_blocks(len(r))
    if lam < 0 or math.isnan(lam):
        raise UserError(f"OWL lambda must be >= 0 (got {lam}); the paper uses 0.08")
    lo, hi = min(r), max(r)
    if hi - lo <= 0.0:
        a = [0.0] * len(r)
    else:
        a = [(x - lo) / (hi - lo) * 2.0 * lam for x in r]
    am = weighted_mean(a, weights)
    rates = [s - (x - am) for x in a]
    if min(rates) < -1e-12 or max(rates) >= 1.0:
        raise UserError(
            f"OWL with lambda={lam} at sparsity {s:g} pushes block rates outside [0, 1); use a smaller lambda"
        )
    return _finalise(rates, s, weights, f"OWL (lambda={lam})")


# --------------------------------------------------------------------------------------------- RMI
def rmi_delta(sparsity: float) -> float:
    """LoSA's allowed deviation from the target: 0.01 (S <= 0.5), 0.02 (S <= 0.6), 0.03 above."""
    s = float(sparsity)
    if s <= 0.5:
        return 0.01
    if s <= 0.6:
        return 0.02
    return 0.03


def linear_cka_matrix(grams: Sequence[Tensor]) -> Tensor:
    """Linear CKA between every pair of blocks from their N x N Gram matrices ``K_l = X_l X_l^T`` (float64).

    Each Gram is symmetrised and centred (``H K H``, ``H = I - 11^T/N``);
    ``HSIC(K, L) = tr(Kc Lc)``; ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``. CKA is invariant to
    scaling a Gram, so 1/N^2 factors are irrelevant. A block whose centred Gram is zero (all samples
    identical) gets CKA 0 with every other block and 1 with itself.
    """
    if len(grams) == 0:
        raise UserError("RMI needs at least one block")
    n = grams[0].shape[0]
    if n < 2:
        raise UserError("RMI needs at least 2 calibration samples (its kernels compare samples)")
    ks = []
    for i, g in enumerate(grams):
        if tuple(g.shape) != (n, n):
            raise ValueError(f"Gram {i} has shape {tuple(g.shape)}, expected {(n, n)}")
        k = g.detach().to(device="cpu", dtype=torch.float64)
        k = 0.5 * (k + k.T)
        k = k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()
        ks.append(k.reshape(-1))
    kc = torch.stack(ks)  # [L, N*N]
    if not bool(torch.isfinite(kc).all()):
        raise UserError("RMI Gram matrices contain NaN/inf (activations overflowed); calibrate in float32")
    hsic = kc @ kc.T  # tr(Kc_a Kc_b) for symmetric Kc
    self_h = torch.diag(hsic).clone()
    denom = torch.sqrt(torch.outer(self_h, self_h))
    cka = torch.where(denom > 0, hsic / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(hsic))
    cka = cka.clamp(-1.0, 1.0)
    cka.fill_diagonal_(1.0)
    return cka


def rmi_importance(grams: Sequence[Tensor], beta: float = 1.0) -> tuple[Tensor, list[float], list[float]]:
    """(CKA matrix, normalised redundancy r_l, importance exp(-beta r_l)) for the RMI allocation.

    ``r_l = sum_{j != l} CKA(l, j)``, normalised to sum 1 (uniform if all are 0).
    """
    cka = linear_cka_matrix(grams)
    L = cka.shape[0]
    red = (cka.sum(dim=1) - torch.diag(cka)).tolist()
    tot = math.fsum(red)
    red = [x / tot for x in red] if tot > 0 else [1.0 / L] * L
    imp = [math.exp(-float(beta) * x) for x in red]
    return cka, red, imp


def solve_box_lp(
    cost: Sequence[float],
    mean: float,
    lo: float,
    hi: float,
    weights: Sequence[float] | None = None,
) -> list[float]:
    """Exact solution of ``min sum_l w_l c_l s_l`` s.t. ``weighted_mean(s) = mean``, ``lo <= s_l <= hi``.

    (``w_l = 1`` without weights, i.e. ``min sum c_l s_l``; with block sizes as weights the cost is per
    parameter.) Sort-and-fill: every block starts at ``lo``, then the cheapest blocks are raised to
    ``hi`` in order of cost until the budget ``sum w (mean - lo)`` is used, the last one fractionally.
    This is optimal for a single linear equality with box bounds (a fractional knapsack). Ties in cost:
    the deeper block is raised first.
    """
    c = [float(x) for x in cost]
    L = len(c)
    _check_blocks(L)
    w = _weights(L, weights)
    lo, hi, mean = float(lo), float(hi), float(mean)
    if lo > hi:
        raise ValueError(f"lower bound {lo} exceeds upper bound {hi}")
    if not (lo - 1e-15 <= mean <= hi + 1e-15):
        raise UserError(f"target mean {mean} is outside the allowed per-block range [{lo}, {hi}]")
    s = [lo] * L
    budget = math.fsum(w) * (mean - lo)
    last = None
    for i in sorted(range(L), key=lambda j: (c[j], -j)):
        if budget <= 0.0:
            break
        add = min(w[i] * (hi - lo), budget)
        s[i] = hi if add == w[i] * (hi - lo) else lo + add / w[i]
        budget -= add
        last = i
    # Absorb float round-off into the fractional block (the one left strictly inside the box, if any).
    for _ in range(3):
        resid = mean * math.fsum(w) - math.fsum(wi * x for wi, x in zip(w, s))
        if resid == 0.0:
            break
        inside = [i for i in range(L) if lo < s[i] < hi]
        j = inside[0] if inside else (last if last is not None else 0)
        s[j] = s[j] + resid / w[j]
    s = [min(max(x, lo), hi) if abs(x - min(max(x, lo), hi)) < 1e-15 else x for x in s]
    err = abs(weighted_mean(s, w) - mean)
    assert err <= _MEAN_TOL, f"box LP mean {weighted_mean(s, w)!r} misses {mean!r}"
    return s


def rmi_rates(
    grams: Sequence[Tensor],
    sparsity: float,
    beta: float = 1.0,
    delta: float | None = None,
    weights: Sequence[float] | None = None,
) -> list[float]:
    """LoSA's RMI rates: minimise ``sum s_l importance_l`` with mean S and ``|s_l - S| <= delta``.

    Importance ``exp(-beta r_l)`` from the CKA redundancy (``rmi_importance``): blocks that share less
    information with the others are more important and get lower sparsity. Solved exactly by
    ``solve_box_lp``; ``delta`` defaults to ``rmi_delta(S)``; bounds are clipped to [0, 1).
    """
    s = _check_target(sparsity)
    d = rmi_delta(s) if delta is None else float(delta)
    if d < 0 or math.isnan(d):
        raise UserError(f"RMI delta must be >= 0 (got {delta})")
    _, _, imp = rmi_importance(grams, beta)
    lo = max(0.0, s - d)
    hi = min(s + d, math.nextafter(1.0, 0.0))
    rates = solve_box_lp(imp, s, lo, hi, weights)
    return _finalise(rates, s, weights, "RMI")


# ------------------------------------------------------------------------------------ within a block
def linear_kind(name: str) -> str:
    """The kind of a linear inside a block: the last part of its name ("model.layers.3.self_attn.k_proj.weight"
    and "self_attn.k_proj" are both "k_proj")."""
    parts = [p for p in name.split(".") if p and p != "weight"]
    return parts[-1] if parts else name


def linear_rates(rate: float, sizes: Mapping[str, int], offsets: Mapping[str, float]) -> dict[str, float]:
    """Per-linear rates inside one block whose parameter-weighted mean is the block's `rate`.

    A linear whose kind (`linear_kind`) has an offset gets ``rate + offset`` (floored at 0); every other linear
    gets one common rate that restores the block's mean. Why: grouped-query attention shares each k / v head
    among several query heads, so their small projections cost more per pruned weight than the MLP's; sparing
    them and pruning the large matrices a little harder keeps the block's (and the model's) sparsity.
    No offsets: every linear at `rate`.
    """
    r = float(rate)
    if not offsets:
        return {name: r for name in sizes}
    fixed = {n: max(0.0, round(r + float(offsets[linear_kind(n)]), 12)) for n in sizes if linear_kind(n) in offsets}
    free = [n for n in sizes if n not in fixed]
    if not free:
        raise UserError(f"--type-offset covers every linear of a block ({', '.join(sorted(offsets))}); leave one "
                        "kind without an offset to keep the block's sparsity")
    total = math.fsum(float(sizes[n]) for n in sizes)
    free_total = math.fsum(float(sizes[n]) for n in free)
    rest = (r * total - math.fsum(fixed[n] * float(sizes[n]) for n in fixed)) / free_total
    rest = 0.0 if -1e-12 < rest < 0.0 else rest
    out = {**fixed, **{n: rest for n in free}}
    if any(not (0.0 <= x < 1.0) for x in out.values()):
        raise UserError(f"--type-offset {dict(offsets)} cannot keep a block at {r:.4g}: it would need rates "
                        f"{ {linear_kind(n): round(x, 4) for n, x in out.items()} }; use smaller offsets")
    # Whole weights: the block prunes exactly as many as uniform rates would; the largest free linear takes the
    # rounding remainder, and each rate is its count / size so the mask rounds back to that count.
    counts = {n: layer_prune_count(out[n], 1, int(sizes[n])) for n in sizes}
    big = max(free, key=lambda n: sizes[n])
    counts[big] += sum(layer_prune_count(r, 1, int(sizes[n])) for n in sizes) - sum(counts.values())
    return {n: counts[n] / int(sizes[n]) for n in sizes}
