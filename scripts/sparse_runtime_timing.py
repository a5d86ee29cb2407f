"""Development timing of the sparse-cpu runtime against ONNX Runtime dense (the official figures come from `bench`).

Interleaved A B A B ...: each round times prefill-128 and decode on every runner in turn; speed-ups are the median
of per-round ratios with their min-max. Also reports where a sparse-cpu decode step goes (executor phase timers),
the same executor with every block linear at 100% sparsity (the non-weight overhead per token), and the Python /
ctypes cost per call (wall minus executor time).

Run under the shared lock:
  flock /tmp/losa-cpu.lock python scripts/sparse_runtime_timing.py SPARSE_EXPORT DENSE_DEEPSPARSE_EXPORT --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np


def _empty_masks(packed: Any) -> Any:
    """The same model with every block linear packed at 100% sparsity (no weights streamed, same bookkeeping)."""
    from losa_deploy.sparse_cpu.pack import VALUE_PAD
    from losa_deploy.sparse_cpu.runtime import Packed

    tensors = {k: v for k, v in packed.tensors.items() if not k.startswith(tuple(packed.layout))}
    layout = {}
    for name, lay in packed.layout.items():
        rows, cols = lay["rows"], lay["cols"]
        tensors[f"{name}.masks"] = np.zeros((rows, -(-cols // 16)), np.uint16)
        tensors[f"{name}.row_ptr"] = np.zeros(rows + 1, np.int64)
        tensors[f"{name}.values"] = np.zeros(VALUE_PAD, np.float32)
        layout[name] = {**lay, "kind": "bitmask", "n": 0, "m": 0, "sparsity": 1.0}
    return Packed(tensors, layout, packed.config)


def _prefill_s(r: Any, ids: np.ndarray) -> float:
    t = time.perf_counter()
    r.prefill(ids)
    return time.perf_counter() - t


def _decode_s(r: Any, ids: np.ndarray, steps: int) -> float:
    """Seconds per decode step after a prefill of `ids` (greedy tokens)."""
    last = r.prefill(ids)[0, -1]
    t = time.perf_counter()
    for _ in range(steps):
        last = r.decode(int(np.argmax(last)))
    return (time.perf_counter() - t) / steps


def _ratio_summary(base: list[float], other: list[float]) -> dict:
    rs = [b / o for b, o in zip(base, other)]
    return {"median": round(statistics.median(rs), 3), "min": round(min(rs), 3), "max": round(max(rs), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sparse", help="sparse-cpu export directory")
    ap.add_argument("dense", nargs="?", help="deepsparse-format export of the dense model (for onnxruntime)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()

    import torch

    from losa_deploy.runners import make_runner
    from losa_deploy.sparse_cpu.runtime import SparseCpuRunner, load_packed, resolve_export_dir

    torch.set_num_threads(a.threads)
    packed = load_packed(resolve_export_dir(__import__("pathlib").Path(a.sparse)))
    kw = dict(prefill_len=a.prefill, max_len=a.max_len, threads=a.threads)
    runners: dict[str, Any] = {
        "sparse-cpu": SparseCpuRunner(packed, **kw),
        "sparse-cpu/lm_head-c": SparseCpuRunner(packed, lm_head="c", **kw),
        "sparse-cpu/lm_head-torch": SparseCpuRunner(packed, lm_head="torch", **kw),
        "sparse-cpu/100%-sparse": SparseCpuRunner(_empty_masks(packed), **kw),
    }
    if a.dense:
        runners["onnxruntime-dense"] = make_runner(a.dense, "onnxruntime", **kw)
    ids = np.random.RandomState(0).randint(0, packed.config.vocab_size, (1, a.prefill))
    for r in runners.values():  # warm-up: first-touch of weights, thread pools, ORT's arena
        _decode_s(r, ids, 4)
    pre: dict[str, list[float]] = {k: [] for k in runners}
    dec: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(a.rounds):
        for k, r in runners.items():
            pre[k].append(_prefill_s(r, ids))
            dec[k].append(_decode_s(r, ids, a.decode_steps))
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "threads": a.threads, "rounds": a.rounds, "prefill_tokens": a.prefill,
        "decode_steps": a.decode_steps, "decode_after": a.prefill,
        "prefill_ms": {k: round(1e3 * statistics.median(v), 2) for k, v in pre.items()},
        "decode_ms_per_token": {k: round(1e3 * statistics.median(v), 3) for k, v in dec.items()},
    }
    if a.dense:
        for k in ("sparse-cpu", "sparse-cpu/lm_head-c", "sparse-cpu/lm_head-torch"):
            res[f"speedup_vs_ort_dense[{k}]"] = {"prefill": _ratio_summary(pre["onnxruntime-dense"], pre[k]),
                                                "decode": _ratio_summary(dec["onnxruntime-dense"], dec[k])}
    # where a decode step goes (executor timers), for the real model and the 100%-sparse one
    for k in ("sparse-cpu", "sparse-cpu/100%-sparse"):
        r = runners[k]
        r.prefill(ids)
        r.read_profile()
        r.profile(True)
        n, last = 64, np.zeros(packed.config.vocab_size, np.float32)
        t = time.perf_counter()
        for _ in range(n):
            last = r.decode(int(np.argmax(last)))
        wall = (time.perf_counter() - t) / n
        r.profile(False)
        prof = {p: round(1e6 * v / n, 1) for p, v in r.read_profile().items()}
        prof["python_and_ctypes"] = round(1e6 * wall - prof["total"], 1)
        res[f"decode_us_per_token_phases[{k}]"] = prof
    print(json.dumps(res, indent=1))
    if a.json:
        from losa_deploy.atomic import write_json

        write_json(a.json, res)


if __name__ == "__main__":
    main()
