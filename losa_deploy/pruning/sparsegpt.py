"""SparseGPT (Frantar & Alistarh, 2023): prune a linear layer and update its kept weights by OBS.

Follows the reference ``SparseGPT.fasterprune`` (IST-DASLab/sparsegpt) step for step, in float32:
dead inputs (H_jj = 0) get H_jj = 1 and a zero weight column; damping ``percdamp * mean(diag H)``;
``U`` = upper Cholesky factor of ``H^-1``; columns are processed in tiles of ``blocksize``; within a
tile each column is pruned and its error ``(w - q) / U_jj`` is spread over the tile's remaining columns
by row ``U_j``; then the tile's errors are spread over the rest of the matrix by ``Err @ U[tile, rest]``.

Two deliberate differences from the reference:

1. Unstructured row-exact budget. The reference picks the lowest ``sparsity`` fraction of
   ``w^2 / U_jj^2`` across the whole rows x tile block, so a row's realised sparsity drifts from the
   target (on SmolLM2-135M, rows of a 50% layer end anywhere from 18% to 93% pruned). Here every row zeroes
   a fixed count, ``masks.row_prune_counts`` of the initial saliency (``floor(s * in)`` or one more, the
   layer exactly ``round(s * out * in)``), as the pipeline's realised-sparsity check requires. How a row's
   budget is split over the tiles (``row_budget``):

   - ``"adaptive"`` (default): from the initial saliency ``W^2 / diag(U)^2``; row r prunes in tile t
     as many weights as its budgeted lowest initial saliencies have in tile t;
   - ``"refresh"``: before each tile, the row's remaining budget goes to its lowest saliencies over all
     columns not yet processed, whose weights already carry the earlier tiles' updates; the tile takes
     those that fall in it (slightly lower error than "adaptive", one extra sort per tile);
   - ``"even"``: by tile width, largest-remainder rounding (the simplest, the worst of the three).

   Within a tile the choice is made on the *updated* weights, as in the reference. Counts are exact in
   all three. ``"tile"`` is the reference's cross-row choice with the layer total made equal to the
   row-exact total (split over tiles by width): same layer sparsity, rows free
   to differ. It gives a lower layer error but fails the per-row check; it is here for comparisons.
2. Cholesky failures (``H`` not positive definite after damping) are retried with 10x the damping, up
   to ``max_retries`` times, instead of crashing; the retries are reported in the info dict.

N:M uses the NVIDIA convention (``n`` KEPT of every ``m``); the reference's ``prunen`` counts pruned
weights. As in the reference, the N:M choice of each group is made when the group's first column is
reached, on the weights already updated by the earlier columns.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..errors import UserError
from .masks import check_nm, check_sparsity, keep_from_counts, row_prune_counts


def _factor(H: Tensor, damp: float) -> Tensor | None:
    """Upper Cholesky factor of (H + damp I)^-1, or None if H + damp I is not positive definite.

    Adds ``damp`` to H's diagonal in place (the caller passes a private copy and, on a retry, the extra
    damping only), to keep the peak memory at about three in x in matrices.
    """
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        return None
    Hinv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(U).all()):
        return None
    return U


def _tile_counts_even(k: int, cols: int, blocksize: int) -> list[int]:
    """Split a row budget k over tiles proportionally to their width (largest remainder)."""
    widths = [min(blocksize, cols - i) for i in range(0, cols, blocksize)]
    exact = [k * w / cols for w in widths]
    counts = [int(math.floor(e + 1e-9)) for e in exact]
    order = sorted(range(len(widths)), key=lambda t: (-(exact[t] - counts[t]), t))
    for t in order[: k - sum(counts)]:
        counts[t] += 1
    return counts


RowBudget = Literal["adaptive", "refresh", "even", "tile"]


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    *,
    max_retries: int = 5,
    row_budget: RowBudget = "adaptive",
    name: str | None = None,
) -> tuple[Tensor, Tensor, dict]:
    """Prune ``weight`` [out, in] with SparseGPT given ``hessian`` [in, in] (= 2/n * sum x x^T).

    ``m == 0``: unstructured, each row zeroes exactly its ``row_prune_counts`` budget.
    ``m > 0``: N:M with ``n`` kept of every ``m`` consecutive inputs (``sparsity`` is then ignored).

    Returns ``(new_weight, keep_mask, info)``: ``new_weight`` in the input dtype/device with exact zeros
    where ``keep_mask`` (bool, True = keep) is False; ``info`` holds ``damping_retries`` (int),
    ``damp`` (final damping relative to mean(diag H)), ``damp_abs`` (absolute), ``dead_inputs``
    (inputs never active in calibration; their weights are zeroed, possibly while still "kept" by the
    mask) and ``obs_loss`` (the OBS estimate of the added squared output error, summed over rows / 2).
    Does not modify its arguments.
    """
    blocksize = _check_args(weight, hessian, sparsity, n, m, blocksize, row_budget, name)
    who = f" for {name}" if name else ""
    W, H, dead, mean_diag = _prepared(weight, hessian, who)
    U, rel, retries = _damped_factor(H, percdamp, mean_diag, max_retries, who)
    del H
    sweep = _Sweep(W, U, sparsity, n, m, blocksize, row_budget)
    keep, losses = sweep.run()
    new_weight = W.to(dtype=weight.dtype)  # exact zeros stay exact in any dtype
    info = {
        "damping_retries": retries,
        "damp": rel,
        "damp_abs": rel * mean_diag,
        "dead_inputs": int(dead.sum()),
        "obs_loss": float(losses.sum()),
    }
    return new_weight, keep, info


def _check_args(weight: Tensor, hessian: Tensor, sparsity: float, n: int, m: int, blocksize: int,
                row_budget: str, name: str | None) -> int:
    """Refuse what cannot be pruned; returns the tile width (a multiple of m for N:M)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight inputs {cols}")
    if m > 0:
        check_nm(n, m)
        if cols % m != 0:
            raise UserError(
                f"layer{' ' + name if name else ''} with weight shape {rows}x{cols} cannot be pruned {n}:{m}: "
                f"{cols} inputs are not a multiple of {m}; exclude it or pick an M that divides {cols}"
            )
        blocksize = max(m, (blocksize // m) * m)
    else:
        check_sparsity(sparsity)
    if row_budget not in ("adaptive", "refresh", "even", "tile"):
        raise ValueError(f"row_budget must be 'adaptive', 'refresh', 'even' or 'tile', got {row_budget!r}")
    return blocksize


def _prepared(weight: Tensor, hessian: Tensor, who: str) -> tuple[Tensor, Tensor, Tensor, float]:
    """fp32 copies of W and H with dead inputs (H_jj = 0) neutralised; (W, H, dead, mean(diag H))."""
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=weight.device, dtype=torch.float32, copy=True)
    if not bool(torch.isfinite(H).all()):
        raise UserError(
            f"the calibration statistics{who} contain NaN/inf (activations overflowed); "
            "calibrate in float32 or with fewer/shorter samples"
        )
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, dead, float(torch.mean(torch.diag(H)))


def _damped_factor(H: Tensor, percdamp: float, mean_diag: float, max_retries: int,
                   who: str) -> tuple[Tensor, float, int]:
    """(U, final relative damping, retries): 10x the damping after each failed Cholesky, up to max_retries."""
    rel = float(percdamp)
    if rel < 0 or math.isnan(rel):
        raise UserError(f"SparseGPT damping must be >= 0 (got {percdamp}); the default is 0.01")
    U = None
    retries = 0
    applied = 0.0  # damping already added to H's diagonal
    for attempt in range(max_retries + 1):
        U = _factor(H, rel * mean_diag - applied)
        applied = rel * mean_diag
        if U is not None:
            break
        if attempt < max_retries:
            retries += 1
            rel = rel * 10.0 if rel > 0 else 1e-3
    if U is None:
        raise UserError(
            f"SparseGPT could not factor the Hessian{who} even with damping {rel:g} x mean(diag H); "
            "use more calibration samples or prune this layer with wanda"
        )
    return U, rel, retries


class _Sweep:
    """The tile-by-tile OBS sweep over W (updated in place): choose each tile's pruned weights, prune them
    column by column spreading each error over the tile, then spread the tile's errors over the rest."""

    def __init__(self, W: Tensor, U: Tensor, sparsity: float, n: int, m: int, blocksize: int,
                 row_budget: RowBudget) -> None:
        self.W, self.U, self.n, self.m, self.blocksize, self.row_budget = W, U, n, m, blocksize, row_budget
        self.rows, self.cols = W.shape
        self.nm = m > 0
        self.udiag = torch.diag(U)
        self.tile_starts = list(range(0, self.cols, blocksize))
        self.keep = torch.ones(self.rows, self.cols, dtype=torch.bool, device=W.device)
        self.k = torch.zeros(self.rows, dtype=torch.long, device=W.device)
        self.row_tile_counts: Tensor | None = None
        self.tile_totals: list[int] = []
        if not self.nm:
            self._row_budgets(float(sparsity))

    def _row_budgets(self, sparsity: float) -> None:
        """Per-row, per-tile prune counts (unstructured), fixed before any update so each row is exact. The rows'
        totals are ``row_prune_counts`` of the initial saliencies: the layer prunes exactly its share."""
        rows, cols, blocksize = self.rows, self.cols, self.blocksize
        init = self.W.square() / self.udiag.square().unsqueeze(0)
        srt = torch.sort(init, dim=1, stable=True)
        self.k = row_prune_counts(srt.values, sparsity)
        if self.row_budget in ("tile", "refresh"):  # chosen per tile in the sweep
            self.tile_totals = _tile_counts_even(int(self.k.sum()), rows * cols, rows * blocksize)
        elif self.row_budget == "even":
            per_k = {k: _tile_counts_even(k, cols, blocksize) for k in self.k.unique().tolist()}
            self.row_tile_counts = torch.tensor([per_k[k] for k in self.k.tolist()], device=self.W.device)
        else:
            pruned = ~keep_from_counts(srt.indices, self.k)
            self.row_tile_counts = torch.stack(
                [pruned[:, i1 : i1 + blocksize].sum(dim=1) for i1 in self.tile_starts], dim=1
            )

    def run(self) -> tuple[Tensor, Tensor]:
        """(keep mask, per-row OBS loss); W holds the pruned, updated weights afterwards."""
        W, U, cols = self.W, self.U, self.cols
        losses = torch.zeros(self.rows, dtype=torch.float64, device=W.device)
        for t, i1 in enumerate(self.tile_starts):
            i2 = min(i1 + self.blocksize, cols)
            W1 = W[:, i1:i2].clone()
            U1 = U[i1:i2, i1:i2]
            d1 = torch.diag(U1)
            prune1 = self._tile_choice(t, i1, W1, d1)
            Err1 = self._prune_columns(W1, U1, d1, prune1)
            keep1 = ~prune1
            # Kept entries of column i are untouched by its own update (err = 0 there); pruned ones are set to
            # an exact 0 rather than left at w - (w / U_ii) * U_ii, which round-off can leave at 1e-8.
            W[:, i1:i2] = W1 * keep1
            self.keep[:, i1:i2] = keep1
            losses += Err1.double().square().sum(dim=1) / 2
            if i2 < cols:
                W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
        return self.keep, losses

    def _tile_choice(self, t: int, i1: int, W1: Tensor, d1: Tensor) -> Tensor:
        """The tile's unstructured choice (bool, True = prune) on the updated weights; N:M chooses per group."""
        rows, count, dev = self.rows, W1.shape[1], W1.device
        prune1 = torch.zeros(rows, count, dtype=torch.bool, device=dev)
        if self.nm:
            return prune1
        if self.row_budget == "refresh":
            # the row's remaining budget goes to its lowest saliencies over all not-yet-processed columns,
            # whose weights already carry the earlier tiles' updates; this tile takes those that fall in it
            rem = self.k - (~self.keep[:, :i1]).sum(dim=1)
            sal = self.W[:, i1:].square() / self.udiag[i1:].square().unsqueeze(0)
            order = torch.sort(sal, dim=1, stable=True).indices
            take = torch.arange(self.cols - i1, device=dev).unsqueeze(0) < rem.unsqueeze(1)
            sel = torch.zeros_like(take).scatter_(1, order, take)
            return sel[:, :count].contiguous()
        if self.row_tile_counts is None:  # reference: lowest fraction of the rows x tile block
            kk = self.tile_totals[t]
            if kk > 0:
                sal = (W1.square() / d1.square().unsqueeze(0)).reshape(-1)
                prune1.view(-1)[torch.sort(sal, stable=True).indices[:kk]] = True
            return prune1
        kt = self.row_tile_counts[:, t]
        if int(kt.max()) > 0:
            sal = W1.square() / d1.square().unsqueeze(0)
            order = torch.sort(sal, dim=1, stable=True).indices
            take = torch.arange(count, device=dev).unsqueeze(0) < kt.unsqueeze(1)
            prune1.scatter_(1, order, take)
        return prune1

    def _prune_columns(self, W1: Tensor, U1: Tensor, d1: Tensor, prune1: Tensor) -> Tensor:
        """Prune the tile column by column (N:M groups chosen at their first column), each column's error
        (w - q) / U_ii spread over the tile's remaining columns; returns the tile's errors."""
        n, m = self.n, self.m
        Err1 = torch.zeros_like(W1)
        pf = prune1.to(W1.dtype)
        for i in range(W1.shape[1]):
            if self.nm and i % m == 0 and n < m:
                sal = W1[:, i : i + m].square() / d1[i : i + m].square().unsqueeze(0)
                drop = torch.sort(sal, dim=1, stable=True).indices[:, : m - n]
                prune1[:, i : i + m].scatter_(1, drop, True)
                pf[:, i : i + m] = prune1[:, i : i + m].to(W1.dtype)
            # q = w on kept rows, 0 on pruned ones: err = (w - q) / U_ii
            err = W1[:, i] * pf[:, i] / d1[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        return Err1
