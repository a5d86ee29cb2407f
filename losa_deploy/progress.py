"""One progress helper for every long step: a Rich bar on a terminal, plain lines in a log.

When stderr is not a terminal (CI, `nohup`, `make demo > log`), Rich draws nothing; `make_progress` then returns
`PlainProgress`, which prints one line such as
    pruning (wanda): 12 of 30 (40%), elapsed 1:02, left ~1:33
when a 10% step is crossed (at most one line per `min_interval` seconds) and at least every `max_interval` seconds,
plus a last line when a task that printed anything finishes. Same calls as rich.progress.Progress (the subset we use).
"""

from __future__ import annotations

import time
from typing import Any, Callable

MIN_INTERVAL_S = 5.0  # a short step prints nothing; a long one about one line per 10%
MAX_INTERVAL_S = 30.0


def make_progress(*columns: Any, console: Any = None, disable: bool = False, transient: bool = True, **kw: Any) -> Any:
    """A rich.progress.Progress on a terminal (or when disabled), else a PlainProgress on the same console."""
    from rich.progress import Progress

    from .console import err

    console = console if console is not None else err
    if disable or console.is_terminal:
        return Progress(*columns, console=console, disable=disable, transient=transient, **kw)
    return PlainProgress(console)


def _clock(s: float) -> str:
    s = int(round(max(s, 0.0)))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class _Task:
    def __init__(self, description: str, total: float | None, now: float, fields: dict[str, Any]) -> None:
        self.description, self.total, self.completed = description, total, 0.0
        self.start = self.last_print = now
        self.printed = False
        self.bucket = 0  # last 10% step printed
        self.fields = fields
        self.finished = False


class PlainProgress:
    """Plain-text stand-in for rich.progress.Progress (add_task / update / advance / start / stop / context)."""

    def __init__(self, console: Any, *, clock: Callable[[], float] = time.monotonic,
                 min_interval: float = MIN_INTERVAL_S, max_interval: float = MAX_INTERVAL_S) -> None:
        self.console, self.clock = console, clock
        self.min_interval, self.max_interval = min_interval, max_interval
        self._tasks: dict[int, _Task] = {}

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for t in self._tasks.values():
            if t.printed and not t.finished and t.total and t.completed >= t.total:
                self._emit(t, self.clock())
                t.finished = True

    def add_task(self, description: str, total: float | None = 100.0, **fields: Any) -> int:
        tid = len(self._tasks)
        self._tasks[tid] = _Task(description, total, self.clock(), dict(fields))
        return tid

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields: Any) -> None:
        t = self._tasks[task_id]
        now = self.clock()
        described = description is not None and description != t.description
        if total is not None:
            t.total = total
        if completed is not None:
            t.completed = completed
        if advance:
            t.completed += advance
        if description is not None:
            t.description = description
        t.fields.update(fields)
        since = now - t.last_print
        if t.total:
            bucket = int(10 * min(t.completed / t.total, 1.0))
            due = (bucket > t.bucket and since >= self.min_interval) or since >= self.max_interval
            if due or (t.printed and not t.finished and t.completed >= t.total):
                t.bucket = bucket
                self._emit(t, now)
                t.finished = t.completed >= t.total
        elif (described and since >= self.min_interval) or since >= self.max_interval:
            self._emit(t, now)  # no total (a phase name that changes): its name and the time so far

    def _emit(self, t: _Task, now: float) -> None:
        elapsed = now - t.start
        if t.total:
            k, n = int(t.completed), int(t.total)
            left = ""
            if 0 < t.completed < t.total:
                left = f", left ~{_clock(elapsed / t.completed * (t.total - t.completed))}"
            extra = "".join(f", {k2} {v}" for k2, v in t.fields.items() if v not in (None, "", "-"))
            pct = 100 * t.completed / t.total
            line = f"{t.description}: {k} of {n} ({pct:.0f}%), elapsed {_clock(elapsed)}{left}{extra}"
        else:
            line = f"{t.description} (elapsed {_clock(elapsed)})"
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        t.last_print, t.printed = now, True
