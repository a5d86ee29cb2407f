"""sparse-cpu kernels against ONNX Runtime's dense MatMul on the same shapes: interleaved A/B pairs.

Each case runs K copies of one weight shape (different random weights), so that decode streams weights from memory
rather than cache (K is chosen so the dense copies exceed --stream-mb). Side A is one ONNX Runtime session holding K
MatMul nodes on the same input (fp32, --threads intra-op threads); side B is our kernel called K times in a row from C
(sp_gemv_seq / sp_gemm_seq: one parallel dispatch per matrix, as the executor calls them). Rounds alternate A B A B,
and the speed-up is the median of per-pair ratios with its min-max. Achieved GB/s (decode, packed bytes) and GFLOP/s
(prefill, kept FLOPs only) are set against the machine's measured bandwidth and peak (losa_deploy/bench/bounds.py).

Run under the shared lock:  flock /tmp/losa-cpu.lock python scripts/bench_kernels.py --out runs/kernels.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losa_deploy.atomic import write_json, write_text  # noqa: E402
from losa_deploy.bench.pairs import ratio_stats  # noqa: E402
from losa_deploy.sparse_cpu import _lib  # noqa: E402
from losa_deploy.sparse_cpu.pack import pack_bitmask, pack_dense, pack_nm  # noqa: E402

SHAPES = {
    "llama-2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "real": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
}
PREFILL_T = {"llama-2-7b": 512, "real": 128}


def ort_session(weights: list[np.ndarray], t: int, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = weights[0].shape
    inits, nodes, outs = [], [], []
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [t, rows]))
    graph = helper.make_graph(nodes, "matmuls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, cols])],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def make_case(rows: int, cols: int, pattern: str, copies: int, rng) -> tuple[list[np.ndarray], list]:
    dense, packed = [], []
    for _ in range(copies):
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        if pattern == "dense":
            p = pack_dense(w)
        elif ":" in pattern:
            n, m = map(int, pattern.split(":"))
            order = rng.random((rows, cols // m, m), dtype=np.float32).argsort(axis=2)
            p = pack_nm(w, (order < n).reshape(rows, cols), n, m)
        else:
            keep = rng.random((rows, cols), dtype=np.float32) >= float(pattern)
            p = pack_bitmask(w, keep)
        dense.append(w)
        packed.append(p)
    return dense, packed


def run_case(shape_set: str, rows: int, cols: int, pattern: str, phase: str, args, rates, rng) -> dict:
    t = 1 if phase == "decode" else PREFILL_T[shape_set]
    dense_bytes = rows * cols * 4
    copies = max(1, int(np.ceil(args.stream_mb * 2**20 / dense_bytes))) if phase == "decode" else 1
    copies = min(copies, args.max_copies)
    dense, packed = make_case(rows, cols, pattern, copies, rng)
    sess = ort_session(dense, t, args.threads)
    del dense
    x = rng.standard_normal((t, cols), dtype=np.float32)
    feed = {"x": x}
    seq = _lib.CallSequence(packed, x[0] if phase == "decode" else x)
    # the two sides must agree (dense reference = ORT) before they are timed
    ref = sess.run(None, feed)
    for p, y, o in zip(packed[:2], seq.outs[:2], ref[:2]):
        seq.run()
        scale = np.abs(o).max() + 1e-6
        if p.kind == "dense" and np.abs(y.reshape(o.shape) - o).max() > 1e-3 * scale:
            raise SystemExit(f"dense result differs from ONNX Runtime on {rows}x{cols}")
    # enough inner repetitions that one timed sample lasts >= --sample-s
    t0 = time.perf_counter()
    seq.run()
    one = time.perf_counter() - t0
    inner = max(1, int(args.sample_s / max(one, 1e-6)))

    def a() -> float:
        s = time.perf_counter()
        for _ in range(inner):
            sess.run(None, feed)
        return (time.perf_counter() - s) / inner / copies

    def b() -> float:
        s = time.perf_counter()
        for _ in range(inner):
            seq.run()
        return (time.perf_counter() - s) / inner / copies

    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(args.pairs):
        # a pause before each side lets the other side's spinning worker threads go to sleep (ONNX Runtime's
        # spin for a while after a run; on 2 cores a spinning thread takes a core from the next side)
        time.sleep(args.gap)
        ta.append(a())
        time.sleep(args.gap)
        tb.append(b())
    stats = ratio_stats([x / y for x, y in zip(ta, tb)])
    nnz = packed[0].nnz
    packed_bytes = packed[0].nbytes
    med_a, med_b = float(np.median(ta)), float(np.median(tb))
    res = {
        "shapes": shape_set, "rows": rows, "cols": cols, "pattern": pattern, "phase": phase, "tokens": t,
        "copies": copies, "inner": inner, "density": nnz / (rows * cols),
        "ort_s": med_a, "sparse_s": med_b, "speedup": stats,
        "bytes_bound_x": dense_bytes / packed_bytes, "flop_bound_x": rows * cols / max(nnz, 1),
        "ort_gbs": dense_bytes / med_a / 1e9, "sparse_gbs": packed_bytes / med_b / 1e9,
        "ort_gflops": 2.0 * t * rows * cols / med_a / 1e9, "sparse_gflops": 2.0 * t * nnz / med_b / 1e9,
    }
    res["sparse_bw_share"] = res["sparse_gbs"] * 1e9 / rates["bytes_per_s"]
    res["ort_bw_share"] = res["ort_gbs"] * 1e9 / rates["bytes_per_s"]
    res["sparse_peak_share"] = res["sparse_gflops"] * 1e9 / rates["flops_per_s"]
    res["ort_peak_share"] = res["ort_gflops"] * 1e9 / rates["flops_per_s"]
    return res


def fmt_row(r: dict) -> str:
    s = r["speedup"]
    if r["phase"] == "decode":
        rate = (f"{r['ort_gbs']:5.1f} {r['sparse_gbs']:5.1f} GB/s ({100 * r['sparse_bw_share']:3.0f}% bw)  "
                f"bound {r['bytes_bound_x']:.2f}x")
    else:
        rate = (f"{r['ort_gflops']:5.0f} {r['sparse_gflops']:5.0f} GF/s ({100 * r['sparse_peak_share']:3.0f}% pk)  "
                f"bound {r['flop_bound_x']:.2f}x")
    flag = "" if s["quotable"] else "  (spread too wide)"
    return (f"{r['shapes']:10s} {r['rows']:5d}x{r['cols']:<5d} {r['pattern']:>5s} {r['phase']:7s} T={r['tokens']:<3d} "
            f"ort {1e3 * r['ort_s']:8.3f} ms  ours {1e3 * r['sparse_s']:8.3f} ms  "
            f"{s['median']:5.2f}x [{s['min']:.2f}-{s['max']:.2f}]  {rate}{flag}")


def markdown(results: list[dict]) -> str:
    """The table for docs/measured: one row per case."""
    lines = ["| shapes | W (rows x cols) | pattern | phase | ORT dense | sparse-cpu | speed-up, median [min-max] | "
             "bound | sparse-cpu rate (share of machine) | ORT rate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["speedup"]
        dec = r["phase"] == "decode"
        bound = r["bytes_bound_x"] if dec else r["flop_bound_x"]
        rate = (f"{r['sparse_gbs']:.1f} GB/s ({100 * r['sparse_bw_share']:.0f}% bw)" if dec
                else f"{r['sparse_gflops']:.0f} GFLOP/s ({100 * r['sparse_peak_share']:.0f}% peak)")
        ort = f"{r['ort_gbs']:.1f} GB/s" if dec else f"{r['ort_gflops']:.0f} GFLOP/s"
        flag = "" if s["quotable"] else " (wide)"
        lines.append(f"| {r['shapes']} | {r['rows']}x{r['cols']} | {r['pattern']} | {r['phase']} T={r['tokens']} | "
                     f"{1e3 * r['ort_s']:.3f} ms | {1e3 * r['sparse_s']:.3f} ms | **{s['median']:.2f}x** "
                     f"[{s['min']:.2f}-{s['max']:.2f}]{flag} | {bound:.2f}x | {rate} | {ort} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-2-7b,real", help="llama-2-7b, real, or both (comma-separated)")
    ap.add_argument("--patterns", default="0.7,0.5", help="sparsities, N:M (2:4, 4:8) or 'dense', comma-separated")
    ap.add_argument("--phases", default="decode,prefill")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--gap", type=float, default=0.05, help="seconds of pause before each timed side")
    ap.add_argument("--sample-s", type=float, default=0.05, help="repeat calls so one timed sample lasts this long")
    ap.add_argument("--stream-mb", type=float, default=384.0, help="decode: dense bytes per case at least this")
    ap.add_argument("--max-copies", type=int, default=256)
    ap.add_argument("--isa", default="auto")
    ap.add_argument("--spin", type=int, default=None, help="pool workers' spin before sleeping, us")
    ap.add_argument("--only", default="", help="only shapes like 4096x4096 (comma-separated)")
    ap.add_argument("--skip-probes", action="store_true", help="do not measure bandwidth/peak (shares left empty)")
    ap.add_argument("--out", default="runs/bench_kernels.json")
    args = ap.parse_args()

    _lib.set_isa(args.isa)
    _lib.set_threads(args.threads)
    if args.spin is not None:
        _lib.set_spin(args.spin)
    if args.skip_probes:
        rates = {"bytes_per_s": float("nan"), "flops_per_s": float("nan"), "method": "not measured"}
    else:
        from losa_deploy.bench.bounds import measure_bandwidth, measure_peak_flops

        bw = measure_bandwidth(threads=args.threads)
        pk = measure_peak_flops(args.threads)
        rates = {"bytes_per_s": bw["bytes_per_s"], "flops_per_s": pk["flops_per_s"],
                 "method": f"{bw['method']}; {pk['method']}"}
    print(f"machine: {rates['bytes_per_s'] / 1e9:.1f} GB/s, {rates['flops_per_s'] / 1e9:.0f} GFLOP/s "
          f"({args.threads} threads); kernels: {_lib.get_isa()}, {_lib.get_threads()} threads", flush=True)
    rng = np.random.default_rng(0)
    only = {s for s in args.only.split(",") if s}
    results = []
    for shape_set in args.shapes.split(","):
        for rows, cols in SHAPES[shape_set]:
            if only and f"{rows}x{cols}" not in only:
                continue
            for pattern in args.patterns.split(","):
                for phase in args.phases.split(","):
                    r = run_case(shape_set, rows, cols, pattern, phase, args, rates, rng)
                    results.append(r)
                    print(fmt_row(r), flush=True)
    out = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads, "isa": _lib.get_isa(), "spin_us": _lib.load().sp_get_spin(), "rates": rates,
        "results": results,
    }
    write_json(args.out, out)
    md = str(Path(args.out).with_suffix(".md"))
    write_text(md, markdown(results))
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
