"""Latency phases of one model on one runtime, measured the same way for dense and sparse.

Phases (batch 1, greedy, token ids drawn once from a seeded generator so dense and sparse see the same input):
- `prefill_<P>`: one forward pass over a P-token prompt from an empty cache; tokens/s = P / latency.
- `decode`: `decode_tokens` single-token steps after a `decode_past`-token prompt (prefilled, untimed);
  tokens/s = decode_tokens / latency; the per-token latency is latency / decode_tokens.
- `ttft`: time to first token = prefill of the first prompt length + picking the token (argmax).
- `e2e_<N>`: end-to-end generation of N tokens after the first prompt (prefill + N-1 decode steps).
Every phase: `warmup` discarded runs, then `repeats` measured runs; median and p90. The runner is built once per
shape (its compile time is reported separately, not counted in any phase).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

import numpy as np

from .timing import PeakMemory, measure


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


def bench_phases(
    factory: RunnerFactory,
    settings: LatencySettings,
    vocab_size: int,
    *,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every phase with runners from `factory`; returns {"phases": {...}, "peak_rss_bytes", ...}."""
    s = settings
    step = on_step or (lambda _m: None)
    phases: dict[str, Any] = {}
    build_s: dict[str, float] = {}
    threads = None
    name = None
    with PeakMemory() as mem:
        for k, p in enumerate(s.prompt_lens):
            first = k == 0
            max_len = p + max(s.gen_tokens if first else 1, 1)  # runners need prefill_len < max_len
            step(f"build prefill {p}")
            t0 = time.perf_counter()
            r = factory(p, max_len)
            if first and s.gen_tokens > 0:
                _ensure_decode(r)
            build_s[f"prefill_{p}"] = time.perf_counter() - t0
            threads, name = getattr(r, "threads", None), getattr(r, "name", None)
            ids = prompt_ids(p, vocab_size, s.seed, k)
            step(f"prefill {p}")
            st = measure(lambda: r.prefill(ids), warmup=s.warmup, repeats=s.repeats, setup=r.reset)
            phases[f"prefill_{p}"] = _phase(st, p, {"prompt_len": p})
            if first:
                step("ttft")
                st = measure(lambda: _argmax_last(r.prefill(ids)), warmup=s.warmup, repeats=s.repeats, setup=r.reset)
                phases["ttft"] = _phase(st, 1, {"prompt_len": p})
                if s.gen_tokens > 0:
                    step(f"generate {s.gen_tokens}")

                    def gen() -> None:
                        tok = _argmax_last(r.prefill(ids))
                        for _ in range(s.gen_tokens - 1):
                            tok = _argmax_last(r.decode(tok))

                    st = measure(gen, warmup=min(s.warmup, 1), repeats=s.repeats, setup=r.reset)
                    phases[f"e2e_{s.gen_tokens}"] = _phase(st, s.gen_tokens, {"prompt_len": p, "gen_tokens": s.gen_tokens})
            del r
        if s.decode_tokens > 0:
            step(f"build decode (past {s.decode_past})")
            t0 = time.perf_counter()
            r = factory(s.decode_past, s.decode_past + s.decode_tokens)
            _ensure_decode(r)
            build_s["decode"] = time.perf_counter() - t0
            threads, name = getattr(r, "threads", threads), getattr(r, "name", name)
            past = prompt_ids(s.decode_past, vocab_size, s.seed, 99)
            state = {"tok": 0}

            def setup() -> None:
                r.reset()
                state["tok"] = _argmax_last(r.prefill(past))

            def dec() -> None:
                tok = state["tok"]
                for _ in range(s.decode_tokens):
                    tok = _argmax_last(r.decode(tok))

            step("decode")
            st = measure(dec, warmup=min(s.warmup, 1), repeats=s.repeats, setup=setup)
            phases["decode"] = _phase(st, s.decode_tokens, {
                "past": s.decode_past, "ms_per_token": 1000.0 * st.median_s / s.decode_tokens})
            del r
    return {"runner": name, "threads": threads, "phases": phases, "build_s": build_s,
            "peak_rss_bytes": mem.peak_bytes, "peak_rss_method": mem.method}


def speedup(dense_s: float | None, sparse_s: float | None) -> float | None:
    """Dense latency / sparse latency (>1: sparse is faster). None when either is missing or not positive."""
    if not dense_s or not sparse_s or dense_s <= 0 or sparse_s <= 0:
        return None
    return dense_s / sparse_s
