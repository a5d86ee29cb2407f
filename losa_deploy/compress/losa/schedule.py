"""LoSA's two schedules (METHODS §4), pure functions so they can be checked by hand.

Sparsity follows the cubic schedule of gradual pruning (Zhu & Gupta): most of the sparsity arrives early,
when the model can still recover, and the last steps only add a little. The average adapter rank grows
linearly, so later, harder steps get more trainable capacity.
"""

from __future__ import annotations

from ...errors import UserError


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise UserError(f"LoSA needs at least 1 step (got {steps})")


def cubic_sparsity(target: float, step: int, steps: int) -> float:
    """S_t = S - S (1 - t/T)^3 for t = 1..T (S_T = S exactly)."""
    _check_steps(steps)
    if not 1 <= step <= steps:
        raise ValueError(f"step {step} outside 1..{steps}")
    if step == steps:
        return float(target)
    return float(target - target * (1.0 - step / steps) ** 3)


def sparsity_schedule(target: float, steps: int) -> list[float]:
    """[S_1, ..., S_T]."""
    _check_steps(steps)
    return [cubic_sparsity(target, t, steps) for t in range(1, steps + 1)]


def rank_schedule(rank_start: float, rank_end: float, steps: int) -> list[float]:
    """Omega_t growing linearly from `rank_start` (t=1) to `rank_end` (t=T); T = 1 gives [rank_end]."""
    _check_steps(steps)
    if steps == 1:
        return [float(rank_end)]
    return [float(rank_start + (rank_end - rank_start) * (t - 1) / (steps - 1)) for t in range(1, steps + 1)]
