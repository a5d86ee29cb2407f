"""Timing that benchmark users trust: warm-up runs, repeated measurements, median and p90, peak memory, threads.

Medians, not means: a shared machine produces rare slow outliers, and the median ignores them while p90 shows them.
Peak memory is the process's resident-set high-water mark (Linux `VmHWM`), reset before each measurement where the
kernel allows it (`/proc/self/clear_refs`), otherwise sampled.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class TimingStats:
    """Seconds per call over `repeats` measured calls (after `warmup` discarded calls)."""

    median_s: float
    p90_s: float
    mean_s: float
    min_s: float
    max_s: float
    repeats: int
    warmup: int
    samples_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TimingStats":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default 'linear' method), q in [0, 100]."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: Sequence[float], warmup: int = 0) -> TimingStats:
    if not samples:
        raise ValueError("no samples to summarise")
    xs = [float(s) for s in samples]
    return TimingStats(
        median_s=percentile(xs, 50),
        p90_s=percentile(xs, 90),
        mean_s=sum(xs) / len(xs),
        min_s=min(xs),
        max_s=max(xs),
        repeats=len(xs),
        warmup=warmup,
        samples_s=xs,
    )


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    repeats: int = 5,
    setup: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TimingStats:
    """Time `fn()`; `setup()` (untimed) runs before every call, e.g. to reset a KV cache and refill the past."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return summarize(samples, warmup)


# ---- memory -----------------------------------------------------------------------------------------------------

def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim), so that the transient copies a
    runner makes while loading do not stay resident and stack up under the next runner's."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0). False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: peak resident memory (bytes) of this process while the block ran.

    Uses VmHWM after a reset where the kernel supports it; otherwise a 5 ms sampling thread (can miss short spikes).
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if reset_peak_rss() and _status_kb("VmHWM") is not None:
            self.method = "VmHWM"
        else:
            self.method = "sampled"
            self.peak_bytes = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        if self.method == "VmHWM":
            self.peak_bytes = (_status_kb("VmHWM") or 0) * 1024
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())


# ---- threads ----------------------------------------------------------------------------------------------------

def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_threads(threads: int | None) -> int:
    """The thread count every runtime gets: the user's, or all available cores. Same for dense and sparse."""
    from ..errors import UserError

    n = available_cores()
    if threads is None:
        return n
    if threads < 1:
        raise UserError(f"--threads must be >= 1 (got {threads})")
    return threads
