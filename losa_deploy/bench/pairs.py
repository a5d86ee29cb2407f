"""Trustworthy speed-ups: interleaved repetitions, per-pair ratios, a distribution-free interval and a quotability rule.

A shared machine drifts (other jobs, frequency, memory traffic) on the scale of seconds to minutes. Timing all
dense repeats and then all sparse repeats lets that drift land on one side only; the same bench on two days gave
DeepSparse decode 0.95x and 1.56x that way. So every measured side of a phase runs once per *round*, in a fixed
order (A B C A B C ...), and a speed-up is computed per round: ratio_i = base_i / test_i. Drift that spans a round
hits both sides of the pair.

The reported speed-up is the median of the per-pair ratios, with its min-max and a distribution-free confidence
interval for that median (order statistics of the ratios, binomial coverage: the sign-test interval; no bootstrap
randomness, so the same samples always give the same interval). A speed-up is *quotable* when it has at least
`MIN_PAIRS` pairs and its interval is narrow: (hi - lo) / median <= `MAX_REL_WIDTH`. Otherwise the report flags it.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

MIN_PAIRS = 3
MAX_REL_WIDTH = 0.25  # the interval may span at most 25% of the median
CI_LEVEL = 0.95


def median(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("median of no values")
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def pair_ratios(base_s: Sequence[float], test_s: Sequence[float]) -> list[float]:
    """Per-round ratio base_i / test_i (> 1: the test side is faster). Both sides must come from the same rounds."""
    if len(base_s) != len(test_s):
        raise ValueError(f"cannot pair {len(base_s)} with {len(test_s)} samples: they must come from the same rounds")
    if any(b <= 0 or t <= 0 for b, t in zip(base_s, test_s)):
        raise ValueError("times must be positive to form ratios")
    return [b / t for b, t in zip(base_s, test_s)]


def median_interval(xs: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(lo, hi, coverage): the narrowest symmetric order-statistic interval [x_(k), x_(n+1-k)] whose coverage of the
    population median is >= `level`, coverage = 1 - 2 P(Binomial(n, 1/2) < k). With too few values for `level`
    (n < 6 at 95%) it is [min, max] with its actual, lower coverage 1 - 2^(1-n)."""
    s = sorted(xs)
    n = len(s)
    if n == 0:
        raise ValueError("interval of no values")
    if n == 1:
        return s[0], s[0], 0.0

    def coverage(k: int) -> float:  # P(x_(k) <= median <= x_(n+1-k)) for a continuous distribution
        tail = sum(math.comb(n, i) for i in range(k)) / 2.0**n
        return 1.0 - 2.0 * tail

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return s[k - 1], s[n - k], coverage(k)


def ratio_stats(ratios: Sequence[float], *, min_pairs: int = MIN_PAIRS, max_rel_width: float = MAX_REL_WIDTH,
                level: float = CI_LEVEL) -> dict[str, Any]:
    """Summary of per-pair ratios: median, min/max, interval, relative width and whether it may be quoted (why not)."""
    if not ratios:
        raise ValueError("no ratios")
    med = median(ratios)
    lo, hi, cov = median_interval(ratios, level)
    rel = (hi - lo) / med if med > 0 else math.inf
    reasons = []
    if len(ratios) < min_pairs:
        reasons.append(f"only {len(ratios)} pair(s), need >= {min_pairs}")
    if rel > max_rel_width:
        reasons.append(f"interval {lo:.2f}-{hi:.2f}x spans {100 * rel:.0f}% of the median "
                       f"(> {100 * max_rel_width:.0f}%)")
    return {"median": med, "min": min(ratios), "max": max(ratios), "ci_low": lo, "ci_high": hi, "ci_coverage": cov,
            "rel_width": rel, "rel_spread": (max(ratios) - min(ratios)) / med if med > 0 else math.inf,
            "pairs": len(ratios), "crosses_one": lo < 1.0 < hi, "quotable": not reasons,
            "reason": "; ".join(reasons) or None, "ratios": [float(r) for r in ratios]}


def interleave(
    calls: Mapping[str, tuple[Callable[[], Any] | None, Callable[[], Any]]],
    *,
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    on_error: Callable[[str, BaseException], None] | None = None,
    gap_s: float = 0.0,
    sleep: Callable[[float], Any] = time.sleep,
) -> dict[str, list[float]]:
    """Time every side round-robin: `warmup` discarded rounds, then `repeats` measured rounds, sides in the mapping's
    order in every round. `calls[name] = (setup or None, fn)`; setup runs untimed before each call, then an untimed
    pause of `gap_s` (so that the previous side's spinning worker threads go to sleep: runtimes share the cores).

    Returns {name: [seconds per measured round]}, index i = round i for every side, so samples pair by index.
    A side that raises is dropped from the remaining rounds and left out of the result (`on_error(name, exc)` is
    told); without `on_error` the exception propagates."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    active = list(calls)
    out: dict[str, list[float]] = {k: [] for k in active}
    for rnd in range(warmup + repeats):
        for name in list(active):
            setup, fn = calls[name]
            try:
                if setup is not None:
                    setup()
                if gap_s > 0:
                    sleep(gap_s)
                t0 = clock()
                fn()
                dt = clock() - t0
            except Exception as e:
                if on_error is None:
                    raise
                on_error(name, e)
                active.remove(name)
                out.pop(name, None)
                continue
            if rnd >= warmup:
                out[name].append(dt)
    return out
