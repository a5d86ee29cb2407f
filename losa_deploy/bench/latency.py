"""Latency phases of one model on one runtime, measured the same way for dense and sparse.

Phases (batch 1, greedy, token ids drawn once from a seeded generator so dense and sparse see the same input):
- `prefill_<P>`: one forward pass over a P-token prompt from an empty cache; tokens/s = P / latency.
- `decode`: `decode_tokens` single-token steps after a `decode_past`-token prompt (prefilled, untimed);
  tokens/s = decode_tokens / latency; the per-token latency is latency / decode_tokens.
- `ttft`: time to first token = prefill of the first prompt length + picking the token (argmax).
- `e2e_<N>`: end-to-end generation of N tokens after the first prompt (prefill + N-1 decode steps).
Every phase: `warmup` discarded rounds, then `repeats` measured rounds; in each round every side (runtime x
dense/sparse) runs once, in a fixed order, so that drift hits all sides alike and speed-ups pair by round (see
pairs.py); per side the median and p90. Runners are built once per shape (build time reported separately, not
counted in any phase); all sides' runners of one shape are alive together.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ..errors import UserError
from .pairs import interleave
from .timing import PeakMemory, current_rss_bytes, release_freed_memory, summarize


class Runner(Protocol):
    name: str
    threads: int

    def prefill(self, ids: np.ndarray) -> np.ndarray: ...

    def decode(self, token_id: int) -> np.ndarray: ...

    def reset(self) -> None: ...


RunnerFactory = Callable[[int, int], Runner]  # (prefill_len, max_len) -> Runner


@dataclass
class LatencySettings:
    prompt_lens: tuple[int, ...] = (128, 512)
    decode_past: int = 256
    decode_tokens: int = 64
    gen_tokens: int = 64
    batch: int = 1
    warmup: int = 2
    repeats: int = 5
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt_lens"] = list(self.prompt_lens)
        return d


def prompt_ids(length: int, vocab_size: int, seed: int, offset: int = 0) -> np.ndarray:
    """[1, length] int64 ids, deterministic, avoiding the lowest ids (often special tokens)."""
    rng = np.random.default_rng(seed + 7919 * offset)
    lo = min(3, vocab_size - 1)
    return rng.integers(lo, vocab_size, size=(1, length), dtype=np.int64)


def _argmax_last(logits: np.ndarray) -> int:
    a = np.asarray(logits)
    return int(a.reshape(-1, a.shape[-1])[-1].argmax())


def _phase(stats: Any, tokens: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    d = stats.to_dict()
    d["tokens"] = tokens
    d["tokens_per_s"] = tokens / stats.median_s if stats.median_s > 0 else None
    d["tokens_per_s_p90"] = tokens / stats.p90_s if stats.p90_s > 0 else None  # the p90 latency, as a rate
    if extra:
        d.update(extra)
    return d


def _ensure_decode(runner: Any) -> None:
    """Build a runner's decode path before timing (runners that build it lazily expose `ensure_decode`)."""
    getattr(runner, "ensure_decode", lambda: None)()


SIDE_GAP_S = 0.005  # untimed pause before each timed call: lets the previous runtime's spinning threads sleep


@dataclass
class Side:
    """One measured (runtime, model variant): its key in reports is `<runtime>/<variant>`."""

    runtime: str
    variant: str  # "dense" | "sparse"
    factory: RunnerFactory
    build_first: bool = False  # a runner whose build peaks high (DeepSparse compiles): built before the others load

    @property
    def key(self) -> str:
        return f"{self.runtime}/{self.variant}"


def bench_sides(
    sides: Sequence[Side],
    settings: LatencySettings,
    vocab_size: int,
    *,
    on_step: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    gap_s: float = SIDE_GAP_S,
) -> dict[str, dict[str, Any]]:
    """Measure every phase on every side, interleaved round-robin (see pairs.py), same token ids for all sides.

    Per shape group (each prompt length, then decode), every side's runner is built, then each phase of the group
    runs `warmup` + `repeats` rounds in which every side runs once, in `sides` order. Sample i of any two sides comes
    from the same round, so speed-ups pair by index. A side that fails (build or run) is reported with status
    `error` and the others go on. Returns {side key: {"status", "runner", "threads", "phases", "build_s",
    "load_rss_bytes", "peak_rss_bytes", "peak_rss_method"} or {"status": "error", "note"}}."""
    return _SideBench(sides, settings, vocab_size, on_step or (lambda _m: None), clock, gap_s).measure()


class _SideBench:
    """One `bench_sides` call: the per-side results, the sides still running, and one method per shape group."""

    def __init__(self, sides: Sequence[Side], settings: LatencySettings, vocab_size: int,
                 step: Callable[[str], None], clock: Callable[[], float], gap_s: float) -> None:
        self.sides, self.s, self.vocab_size = list(sides), settings, vocab_size
        self.step, self.clock, self.gap_s = step, clock, gap_s
        self.res: dict[str, dict[str, Any]] = {sd.key: {"status": "ok", "runner": None, "threads": None,
                                                        "phases": {}, "build_s": {}, "load_rss_bytes": 0}
                                               for sd in sides}
        self.active = list(sides)

    def measure(self) -> dict[str, dict[str, Any]]:
        release_freed_memory()
        start_rss = current_rss_bytes()
        with PeakMemory() as mem:
            for k, p in enumerate(self.s.prompt_lens):
                self._prefill_group(k, p)
                release_freed_memory()
            if self.s.decode_tokens > 0:
                self._decode_group()
        for d in self.res.values():
            if d["status"] == "ok":
                d["peak_rss_bytes"], d["peak_rss_method"] = mem.peak_bytes, mem.method
                d["start_rss_bytes"] = start_rss
        return self.res

    def _fail(self, key: str, e: BaseException) -> None:
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        self.res[key] = {"status": "error", "note": f"{type(e).__name__}: {msg}"}
        self.active[:] = [sd for sd in self.active if sd.key != key]

    def _build(self, group: str, prefill_len: int, max_len: int, decode: bool) -> dict[str, Any]:
        runners: dict[str, Any] = {}
        # Heavy builds first, while little else is resident: the process peak is then that build's transient alone,
        # not on top of every other runner. Timing order is unchanged (it follows `sides`).
        for sd in sorted(self.active, key=lambda sd: not sd.build_first):
            self.step(f"build {group}: {sd.key}")
            release_freed_memory()
            rss0 = current_rss_bytes()
            t0 = time.perf_counter()
            try:
                r = sd.factory(prefill_len, max_len)
                if decode:
                    _ensure_decode(r)
            except Exception as e:
                if isinstance(e, UserError) and len(self.sides) == 1:
                    raise
                self._fail(sd.key, e)
                continue
            d = self.res[sd.key]
            d["build_s"][group] = time.perf_counter() - t0
            release_freed_memory()
            d["load_rss_bytes"] = max(d["load_rss_bytes"], current_rss_bytes() - rss0)
            d["threads"], d["runner"] = getattr(r, "threads", None), getattr(r, "name", None)
            runners[sd.key] = r
        return {sd.key: runners[sd.key] for sd in self.active if sd.key in runners}

    def _run(self, phase: str, calls: dict[str, tuple[Any, Any]], tokens: int, warmup: int,
             extra: dict[str, Any]) -> None:
        self.step(phase)
        live = {k: v for k, v in calls.items() if k in self.res and self.res[k]["status"] == "ok"}
        got = interleave(live, warmup=warmup, repeats=self.s.repeats, clock=self.clock, on_error=self._fail,
                         gap_s=self.gap_s)
        for k, samples in got.items():
            self.res[k]["phases"][phase] = _phase(summarize(samples, warmup), tokens, dict(extra))

    def _prefill_group(self, k: int, p: int) -> None:
        """prefill_<p>; for the first prompt length also ttft and e2e_<gen_tokens>."""
        s, first = self.s, k == 0
        max_len = p + max(s.gen_tokens if first else 1, 1)  # runners need prefill_len < max_len
        runners = self._build(f"prefill_{p}", p, max_len, first and s.gen_tokens > 0)
        ids = prompt_ids(p, self.vocab_size, s.seed, k)
        self._run(f"prefill_{p}", {key: (r.reset, lambda r=r: r.prefill(ids)) for key, r in runners.items()},
                  p, s.warmup, {"prompt_len": p})
        if not first:
            return
        self._run("ttft", {key: (r.reset, lambda r=r: _argmax_last(r.prefill(ids))) for key, r in runners.items()},
                  1, s.warmup, {"prompt_len": p})
        if s.gen_tokens > 0:
            def gen(r: Any) -> None:
                tok = _argmax_last(r.prefill(ids))
                for _ in range(s.gen_tokens - 1):
                    tok = _argmax_last(r.decode(tok))

            self._run(f"e2e_{s.gen_tokens}", {key: (r.reset, lambda r=r: gen(r)) for key, r in runners.items()},
                      s.gen_tokens, min(s.warmup, 1), {"prompt_len": p, "gen_tokens": s.gen_tokens})

    def _decode_group(self) -> None:
        """decode_tokens single-token steps after an untimed decode_past-token prefill."""
        s = self.s
        runners = self._build("decode", s.decode_past, s.decode_past + s.decode_tokens, True)
        past = prompt_ids(s.decode_past, self.vocab_size, s.seed, 99)
        first_tok: dict[str, int] = {}

        def setup(key: str, r: Any) -> None:
            r.reset()
            first_tok[key] = _argmax_last(r.prefill(past))

        def dec(key: str, r: Any) -> None:
            tok = first_tok[key]
            for _ in range(s.decode_tokens):
                tok = _argmax_last(r.decode(tok))

        self._run("decode", {key: (lambda key=key, r=r: setup(key, r), lambda key=key, r=r: dec(key, r))
                             for key, r in runners.items()},
                  s.decode_tokens, min(s.warmup, 1), {"past": s.decode_past})
        for key in runners:
            ph = self.res[key].get("phases", {}).get("decode")
            if ph:
                ph["ms_per_token"] = 1000.0 * ph["median_s"] / s.decode_tokens


def bench_phases(
    factory: RunnerFactory,
    settings: LatencySettings,
    vocab_size: int,
    *,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every phase with runners from `factory` alone (one side); returns {"phases": {...}, ...}."""
    out = bench_sides([Side("one", "x", factory)], settings, vocab_size, on_step=on_step)["one/x"]
    if out["status"] != "ok":
        raise RuntimeError(out["note"])
    out.pop("status")
    return out


def speedup(dense_s: float | None, sparse_s: float | None) -> float | None:
    """Dense latency / sparse latency (>1: sparse is faster). None when either is missing or not positive."""
    if not dense_s or not sparse_s or dense_s <= 0 or sparse_s <= 0:
        return None
    return dense_s / sparse_s
