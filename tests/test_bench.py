"""bench: timing statistics, bounds and speed-up arithmetic (hand-computed), report schema round trip, compare mode,
error cases, the 7B-shape builder (at tiny shapes), and a real bench of a tiny exported model on ORT/DeepSparse."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from losa_deploy.bench import bounds as B
from losa_deploy.bench import report as R
from losa_deploy.bench.latency import LatencySettings, bench_phases, speedup
from losa_deploy.bench.run import (BenchOptions, check_same_architecture, parse_int_list, parse_runtimes, run_bench,
                                   select_runtimes)
from losa_deploy.bench.timing import PeakMemory, measure, percentile, summarize
from losa_deploy.errors import UserError

HAS_RUNNERS = (importlib.util.find_spec("losa_deploy.runners") is not None
               and importlib.util.find_spec("exporters.deepsparse_export") is not None)
HAS_DS = importlib.util.find_spec("deepsparse") is not None


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "losa_deploy.cli", *args], capture_output=True, text=True)


# ---- timing -----------------------------------------------------------------------------------------------------

def test_percentile_matches_numpy_linear():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 90) == pytest.approx(4.6)  # pos 3.6 between 4 and 5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    rng = np.random.default_rng(0)
    ys = list(rng.random(17))
    for q in (0, 10, 50, 90, 100):
        assert percentile(ys, q) == pytest.approx(float(np.percentile(ys, q)))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_measure_on_fake_callable_and_clock():
    """A fake clock advancing by a scripted amount per call: the stats must be exactly those durations."""
    durations = iter([9.0, 9.0, 1.0, 3.0, 2.0, 5.0, 4.0])  # 2 warm-up calls, then 5 measured
    now = [0.0]
    calls = {"fn": 0, "setup": 0}

    def fn():
        calls["fn"] += 1
        now[0] += next(durations)

    def setup():
        calls["setup"] += 1
        now[0] += 100.0  # setup time must not be counted

    st = measure(fn, warmup=2, repeats=5, setup=setup, clock=lambda: now[0])
    assert calls == {"fn": 7, "setup": 7}
    assert st.samples_s == [1.0, 3.0, 2.0, 5.0, 4.0]
    assert st.median_s == 3.0 and st.p90_s == pytest.approx(4.6) and st.mean_s == 3.0
    assert (st.min_s, st.max_s, st.repeats, st.warmup) == (1.0, 5.0, 5, 2)
    with pytest.raises(ValueError):
        measure(fn, repeats=0)


def test_peak_memory_sees_an_allocation():
    with PeakMemory() as m:
        a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        a += 1
    before = m.peak_bytes
    del a
    assert m.method in ("VmHWM", "sampled")
    assert before > 64 * 2**20


def test_bench_phases_with_fake_runner():
    """The phase driver on a fake runner that counts calls: every phase present, tokens/s = tokens / median."""

    class Fake:
        name, threads = "fake", 1

        def __init__(self, p, L):
            assert 1 <= p < L, "runners need prefill_len < max_len"
            self.p, self.L, self.n = p, L, 0

        def reset(self):
            self.n = 0

        def prefill(self, ids):
            assert ids.shape == (1, self.p) and ids.dtype == np.int64
            self.n = ids.shape[1]
            return np.zeros((1, ids.shape[1], 11), np.float32)

        def decode(self, tok):
            self.n += 1
            assert self.n <= self.L, "cache overflow: max_len too small"
            return np.zeros((1, 11), np.float32)

    built = []

    def factory(p, L):
        built.append((p, L))
        return Fake(p, L)

    s = LatencySettings(prompt_lens=(8, 16), decode_past=12, decode_tokens=5, gen_tokens=4, warmup=1, repeats=3)
    res = bench_phases(factory, s, vocab_size=11)
    assert built == [(8, 12), (16, 17), (12, 17)]
    ph = res["phases"]
    assert set(ph) == {"prefill_8", "prefill_16", "ttft", "e2e_4", "decode"}
    assert ph["prefill_8"]["tokens_per_s"] == pytest.approx(8 / ph["prefill_8"]["median_s"])
    assert ph["decode"]["tokens"] == 5 and ph["decode"]["past"] == 12
    assert ph["decode"]["ms_per_token"] == pytest.approx(1000 * ph["decode"]["median_s"] / 5)
    assert res["threads"] == 1 and res["peak_rss_bytes"] > 0
    built.clear()
    res = bench_phases(factory, LatencySettings(prompt_lens=(8,), decode_past=8, decode_tokens=0, gen_tokens=0,
                                                warmup=0, repeats=1), vocab_size=11)
    assert built == [(8, 9)] and set(res["phases"]) == {"prefill_8", "ttft"}


def test_bench_sides_interleaves_runners_and_isolates_failures():
    """Two sides alternate call by call in every phase; a side whose runner cannot be built is an error, not fatal."""
    from losa_deploy.bench.latency import Side, bench_sides

    log = []

    class R:
        threads = 1

        def __init__(self, name, p, L):
            self.name = name

        def reset(self):
            pass

        def prefill(self, ids):
            log.append((self.name, "prefill", ids.shape[1]))
            return np.zeros((1, ids.shape[1], 7), np.float32)

        def decode(self, tok):
            log.append((self.name, "decode", 1))
            return np.zeros((1, 7), np.float32)

    built = []

    def broken(p, L):
        built.append("c")
        raise RuntimeError("no such engine")

    def make(name):
        def fac(p, L):
            built.append(name)
            return R(name, p, L)
        return fac

    sides = [Side("a", "dense", make("a")), Side("b", "sparse", make("b"), build_first=True),
             Side("c", "sparse", broken)]
    s = LatencySettings(prompt_lens=(4,), decode_past=3, decode_tokens=2, gen_tokens=0, warmup=1, repeats=2)
    res = bench_sides(sides, s, vocab_size=7)
    assert res["c/sparse"] == {"status": "error", "note": "RuntimeError: no such engine"}
    assert res["a/dense"]["status"] == res["b/sparse"]["status"] == "ok"
    pre = [n for n, kind, L in log if kind == "prefill" and L == 4]
    assert pre == ["a", "b"] * 6  # prefill_4 then ttft: 3 rounds each (1 warm-up + 2), in `sides` order
    assert built == ["b", "a", "c", "b", "a"]  # the heavy build first; c failed once and was dropped
    dec = [n for n, kind, _ in log if kind == "decode"]
    assert dec == ["a", "a", "b", "b"] * 3  # decode: 1 warm-up + 2 rounds of 2 steps per side
    for k in ("a/dense", "b/sparse"):
        assert set(res[k]["phases"]) == {"prefill_4", "ttft", "decode"}
        assert len(res[k]["phases"]["decode"]["samples_s"]) == 2


# ---- arithmetic -------------------------------------------------------------------------------------------------

def test_speedup_arithmetic():
    assert speedup(2.0, 1.0) == 2.0
    assert speedup(1.0, 4.0) == 0.25
    assert speedup(None, 1.0) is None and speedup(1.0, 0.0) is None


def _phase(median, tokens=1):
    st = summarize([median, median * 1.1, median * 0.9])
    d = st.to_dict()
    d.update(tokens=tokens, tokens_per_s=tokens / st.median_s)
    return d


def _suite(name="model", sparsity=0.7):
    return {
        "name": name, "description": "test",
        "runtimes": {
            "onnxruntime": {"status": "ok",
                            "dense": {"phases": {"prefill_128": _phase(0.30, 128), "decode": _phase(0.64, 64)}},
                            "sparse": {"phases": {"prefill_128": _phase(0.29, 128), "decode": _phase(0.60, 64)}}},
            "deepsparse": {"status": "ok",
                           "dense": {"phases": {"prefill_128": _phase(0.25, 128), "decode": _phase(0.50, 64)}},
                           "sparse": {"phases": {"prefill_128": _phase(0.10, 128), "decode": _phase(0.32, 64)}}},
            "torch-cuda / torch-2of4": {"status": "skipped", "note": "no CUDA GPU"},
        },
        "bounds": {"dense": {"prefill_128": {"seconds": 0.15}, "decode": {"seconds": 0.005}},
                   "sparse": {"prefill_128": {"seconds": 0.05}, "decode": {"seconds": 0.0025}}},
        "sparsity": sparsity,
    }


def test_suite_speedups_headline_and_percent_of_bound():
    s = R.finalize_suite(_suite())
    hl = "deepsparse vs onnxruntime dense"
    assert s["headline"] == hl
    assert s["speedups"][hl]["prefill_128"] == pytest.approx(0.30 / 0.10)
    assert s["speedups"][hl]["decode"] == pytest.approx(0.64 / 0.32)
    assert s["speedups"]["onnxruntime vs onnxruntime dense"]["decode"] == pytest.approx(0.64 / 0.60)
    assert s["speedups"]["deepsparse vs deepsparse dense"]["prefill_128"] == pytest.approx(2.5)
    # decode bound is per token, the phase times 64 tokens: 0.0025 * 64 / 0.32 = 50 %
    assert s["percent_of_bound"]["deepsparse"]["sparse"]["decode"] == pytest.approx(50.0)
    assert s["percent_of_bound"]["onnxruntime"]["dense"]["prefill_128"] == pytest.approx(50.0)


def test_apply_rates_rederives_bounds_and_percentages():
    """A second, higher machine-rate probe rescales every bound (work / rate) and the percentages built on them."""
    ph = _phase(0.5, 128)
    suite = {"runtimes": {"onnxruntime": {"status": "ok", "dense": {"phases": {"prefill_128": ph}}}},
             "bounds": {"dense": {"prefill_128": {"work": 100.0, "unit": "FLOP", "rate": 1000.0, "seconds": 0.1},
                                  "decode": {"work": 50.0, "unit": "B", "rate": 100.0, "seconds": 0.5}}},
             "kernels": {"linears": {"mlp.up_proj": {"decode": {"bytes": 40.0, "median_s": 0.8, "bound_s": 0.4},
                                                     "prefill_128": {"flops": 100.0, "median_s": 0.4, "bound_s": 0.1}}},
                         "total": {"decode": {"median_s": 0.8, "bound_s": 0.4}}}}
    R.apply_rates(suite, {"flops_per_s": 500.0, "bytes_per_s": 200.0})
    assert suite["bounds"]["dense"]["prefill_128"]["seconds"] == pytest.approx(0.2)
    assert suite["bounds"]["dense"]["decode"]["seconds"] == pytest.approx(0.25)
    assert suite["percent_of_bound"]["onnxruntime"]["dense"]["prefill_128"] == pytest.approx(100 * 0.2 / 0.5)
    up = suite["kernels"]["linears"]["mlp.up_proj"]
    assert up["decode"]["bound_s"] == pytest.approx(0.2) and up["decode"]["percent_of_bound"] == pytest.approx(25.0)
    assert up["prefill_128"]["percent_of_bound"] == pytest.approx(50.0)
    assert suite["kernels"]["total"]["decode"]["percent_of_bound"] == pytest.approx(25.0)


def test_bounds_hand_computed():
    t = [B.TensorInfo("model.layers.0.mlp.up_proj.weight", 4, 16, 16, "block_linear"),  # 75% sparse
         B.TensorInfo("lm_head.weight", 10, 16, 160, "lm_head"),
         B.TensorInfo("model.embed_tokens.weight", 10, 16, 160, "embedding")]
    inv = B.WeightInventory(t, num_layers=1, hidden=16, num_heads=2, kv_dim=8, other_params=32)
    assert B.sparse_tensor_bytes(64, 16) == 8 + 64
    assert B.sparse_tensor_bytes(64, 64) == 256  # never more than dense
    dense = B.decode_bytes(inv, past=5, sparse=False)
    assert dense["weights"] == 4 * 64 + 4 * 160 + 4 * 16  # block + lm_head + one embedding row
    assert dense["kv_cache"] == 2 * 1 * 5 * 8 * 4
    assert dense["total"] == dense["weights"] + dense["kv_cache"] + 32 * 4
    sp = B.decode_bytes(inv, past=5, sparse=True)
    assert sp["weights"] == 72 + 4 * 160 + 4 * 16  # lm_head is dense, so its sparse encoding is not smaller
    f = B.prefill_flops(inv, 3, sparse=True)
    assert f["linear"] == 2 * 3 * (16 + 160) and f["attention"] == 4 * 9 * 16
    bd = B.decode_bound(inv, 5, False, bytes_per_s=1000.0)
    assert bd.seconds == pytest.approx(dense["total"] / 1000.0)
    assert B.percent_of_bound(0.5, 2.0) == 25.0 and B.percent_of_bound(1.0, 0) is None
    assert B.classify("model.layers.3.self_attn.q_proj.weight") == "block_linear"
    assert B.classify("lm_head.weight") == "lm_head" and B.classify("model.embed_tokens.weight") == "embedding"


def test_packed_format_bytes_hand_computed():
    """sparse-cpu streams values + one uint16 mask per 16 inputs (last group padded) + int64 row pointers."""
    assert B.packed_tensor_bytes(4, 20, 30) == 30 * 4 + 4 * 2 * 2 + 5 * 8
    assert B.packed_tensor_bytes(1, 16, 0) == 0 + 1 * 1 * 2 + 2 * 8
    t = [B.TensorInfo("model.layers.0.mlp.up_proj.weight", 4, 16, 16, "block_linear"),
         B.TensorInfo("lm_head.weight", 10, 16, 160, "lm_head"),
         B.TensorInfo("model.embed_tokens.weight", 10, 16, 160, "embedding")]
    inv = B.WeightInventory(t, num_layers=1, hidden=16, num_heads=2, kv_dim=8, other_params=32)
    pk = B.decode_bytes(inv, past=5, sparse=True, packed=True)
    assert pk["weights"] == (16 * 4 + 4 * 1 * 2 + 5 * 8) + 4 * 160 + 4 * 16  # packed block + dense lm_head + one row
    assert pk["kv_cache"] == 2 * 1 * 5 * 8 * 4
    bd = B.bounds_for(inv, sparse=True, packed=True, prompt_lens=(3,), decode_past=5, flops_per_s=1e3, bytes_per_s=1e3)
    assert bd["decode"]["work"] == pk["total"] and bd["prefill_3"]["detail"]["linear"] == 2 * 3 * (16 + 160)


def test_inventory_of_tied_model_counts_lm_head(tiny_dir):
    inv = B.inventory_from_dir(tiny_dir)
    roles = [t.role for t in inv.tensors]
    assert roles.count("lm_head") == 1 and roles.count("embedding") == 1
    assert sum(r == "block_linear" for r in roles) == 4 * 7
    assert inv.num_layers == 4 and inv.hidden == 64 and inv.kv_dim == 2 * 16


# ---- interleaving, per-pair ratios, quotability (pairs.py) --------------------------------------------------------

def test_pair_ratios_and_median():
    from losa_deploy.bench.pairs import median, pair_ratios

    assert pair_ratios([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == [2.0, 2.0, 3.0]
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError, match="same rounds"):
        pair_ratios([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        pair_ratios([1.0], [0.0])


def test_median_interval_order_statistics():
    from losa_deploy.bench.pairs import median_interval

    # n = 5: no pair of order statistics reaches 95%, so [min, max] with coverage 1 - 2 / 2^5
    assert median_interval([5.0, 1.0, 4.0, 2.0, 3.0]) == (1.0, 5.0, 1 - 2 / 32)
    # n = 9: [x_(2), x_(8)], coverage 1 - 2 (1 + 9) / 2^9 = 0.9609 >= 0.95 (x_(3)..x_(7) would be 0.820)
    lo, hi, cov = median_interval([float(i) for i in range(1, 10)])
    assert (lo, hi) == (2.0, 8.0) and cov == pytest.approx(1 - 2 * 10 / 512)
    assert median_interval([7.0]) == (7.0, 7.0, 0.0)


def test_ratio_stats_quotable_rule():
    from losa_deploy.bench.pairs import ratio_stats

    ok = ratio_stats([2.0, 2.1, 1.9, 2.05, 1.95])
    assert ok["median"] == 2.0 and (ok["ci_low"], ok["ci_high"]) == (1.9, 2.1) and ok["min"] == 1.9 and ok["max"] == 2.1
    assert ok["rel_width"] == pytest.approx(0.1) and ok["quotable"] and ok["reason"] is None and not ok["crosses_one"]
    wide = ratio_stats([1.0, 1.5, 0.8, 1.2, 2.0])  # median 1.2, interval 0.8-2.0 = 100% of it
    assert wide["median"] == 1.2 and wide["rel_width"] == pytest.approx(1.0) and wide["crosses_one"]
    assert not wide["quotable"] and "spans 100% of the median" in wide["reason"]
    few = ratio_stats([2.0, 2.0])
    assert not few["quotable"] and "only 2 pair(s)" in few["reason"]
    near = ratio_stats([0.9, 1.0, 1.1])  # 3 pairs, interval = min-max 0.9-1.1: 20% of the median, quotable
    assert near["rel_width"] == pytest.approx(0.2) and near["quotable"] and near["crosses_one"]
    assert not ratio_stats([0.8, 1.0, 1.25])["quotable"]  # 45% of the median


def test_interleave_round_robin_with_fake_clock():
    """Sides alternate A B A B; warm-up rounds are discarded; a failing side is dropped, the others go on."""
    from losa_deploy.bench.pairs import interleave

    now = [0.0]
    order = []
    cost = {"A": iter([9, 9, 1, 2, 3]), "B": iter([9, 9, 4, 5, 6])}

    def call(name):
        def fn():
            order.append(name)
            now[0] += next(cost[name])
        return fn

    def setup():
        now[0] += 100.0  # untimed

    got = interleave({"A": (setup, call("A")), "B": (None, call("B"))}, warmup=2, repeats=3, clock=lambda: now[0])
    assert order == ["A", "B"] * 5
    assert got == {"A": [1.0, 2.0, 3.0], "B": [4.0, 5.0, 6.0]}
    n = {"k": 0}

    def flaky():
        n["k"] += 1
        if n["k"] == 2:
            raise RuntimeError("boom")

    errors = []
    order.clear()
    cost["A"] = iter([1, 1, 1])
    got = interleave({"C": (None, flaky), "A": (None, call("A"))}, warmup=0, repeats=3, clock=lambda: now[0],
                     on_error=lambda k, e: errors.append((k, str(e))))
    assert errors == [("C", "boom")] and list(got) == ["A"] and len(got["A"]) == 3
    with pytest.raises(ZeroDivisionError):  # without on_error a failure propagates
        interleave({"C": (None, lambda: 1 / 0)}, warmup=0, repeats=1)


def _samples(xs, tokens=1):
    d = summarize(xs).to_dict()
    d.update(tokens=tokens, tokens_per_s=tokens / d["median_s"])
    return d


def test_speedups_pair_by_round_and_fastest_dense():
    """The headline pairs sparse-cpu with the fastest dense side of each phase, round by round."""
    suite = {"name": "model", "runtimes": {
        # decode: ORT dense is the faster dense side; prefill: sparse-cpu on the dense model is
        "onnxruntime": {"status": "ok", "dense": {"phases": {"decode": _samples([10.0, 12.0, 30.0]),
                                                             "prefill_8": _samples([8.0, 8.0, 8.0])}}},
        "sparse-cpu": {"status": "ok", "dense": {"phases": {"decode": _samples([20.0, 20.0, 20.0]),
                                                            "prefill_8": _samples([6.0, 6.0, 6.0])}},
                       "sparse": {"phases": {"decode": _samples([5.0, 12.0, 10.0]),
                                             "prefill_8": _samples([2.0, 3.0, 4.0])}}},
    }}
    s = R.finalize_suite(suite)
    hl = "sparse-cpu vs fastest dense"
    assert s["headline"] == hl
    st = s["speedup_stats"][hl]
    assert st["decode"]["base"] == "onnxruntime/dense" and st["prefill_8"]["base"] == "sparse-cpu/dense"
    # per-round ratios 10/5, 12/12, 30/10 = 2, 1, 3: median 2 (the ratio of medians would be 12/10 = 1.2)
    assert st["decode"]["ratios"] == [2.0, 1.0, 3.0] and s["speedups"][hl]["decode"] == 2.0
    assert st["prefill_8"]["ratios"] == [3.0, 2.0, 1.5] and s["speedups"][hl]["prefill_8"] == 2.0
    assert s["speedups"]["sparse-cpu vs onnxruntime dense"]["prefill_8"] == pytest.approx(8 / 3)
    assert s["speedups"]["sparse-cpu vs sparse-cpu dense"]["decode"] == pytest.approx(20 / 10)
    assert "deepsparse vs onnxruntime dense" not in s["speedups"]
    # both headline phases span far more than 25% of their median: flagged, headline not quotable
    assert not s["headline_quotable"]
    assert any(f.startswith(f"{hl}: decode:") for f in s["flags"])
    md = R.render_markdown({"suites": [s], "flags": [f"model: {f}" for f in s["flags"]]})
    assert "WIDE" in md and "## Flags" in md and "[vs onnxruntime/dense]" in md


# ---- report -----------------------------------------------------------------------------------------------------

def _report(tmp_path, sparsity=0.7, name="r70"):
    rep = R.new_report({"threads": 2, "latency": LatencySettings().to_dict()}, ["losa-deploy", "bench"])
    rep["models"] = {"sparse": {"path": "x", "sparsity": sparsity, "model_type": "llama", "layers": 4, "hidden": 64}}
    rep["suites"].append(R.finalize_suite(_suite(sparsity=sparsity)))
    rep["accuracy"] = {"perplexity": {"seqlen": 128, "dense": {"perplexity": 20.0}, "sparse": {"perplexity": 31.5}},
                       "zeroshot": {"dense": {"tasks": {"piqa": {"acc": 0.6}}},
                                    "sparse": {"tasks": {"piqa": {"acc": 0.55}}}}}
    out = tmp_path / name
    paths = R.write_report(rep, out, [0.6, 0.7, 0.8])
    return rep, out, paths


def test_report_schema_round_trip(tmp_path):
    rep, out, paths = _report(tmp_path)
    back = R.load_report(out / "report.json")
    assert back == json.loads(json.dumps(rep))
    assert back["schema"] == R.SCHEMA and back["version"] == R.VERSION
    for key in ("cpu_model", "cores_available", "avx512_flags", "memory_bytes"):
        assert key in back["hardware"]
    assert back["versions"]["torch"]
    md = (out / "report.md").read_text()
    assert "3.00x" in md and "perplexity" in md and "31.500" in md
    assert "deepsparse vs onnxruntime dense (headline)" in md
    assert (out / "plots" / "speedup.png").stat().st_size > 1000
    assert (out / "plots" / "block_sparsity.png").stat().st_size > 1000
    assert not list(out.rglob("*.tmp*"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(UserError, match="not a losa-deploy bench report"):
        R.load_report(bad)
    bad.write_text(json.dumps({**rep, "version": 99}))
    with pytest.raises(UserError, match="version 99"):
        R.load_report(bad)


def test_compare_mode_cli(tmp_path):
    _report(tmp_path, 0.5, "r50")
    _report(tmp_path, 0.7, "r70")
    r = cli("bench", "--compare", str(tmp_path / "r50" / "report.json"), "--compare", str(tmp_path / "r70"),
            "--out", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert cmp["schema"] == R.COMPARE_SCHEMA and [row["report"] for row in cmp["rows"]] == ["r50", "r70"]
    assert cmp["rows"][1]["speedups"]["prefill_128"] == pytest.approx(3.0)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| r50 | model | 50% |" in md and "| r70 | model | 70% |" in md
    r = cli("bench", "--compare", str(tmp_path / "nope.json"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


# ---- errors -----------------------------------------------------------------------------------------------------

def test_mismatched_baseline_refused(tmp_path, tiny_dir):
    from tiny import save_tiny

    other = save_tiny(tmp_path / "other", layers=2)
    r = cli("bench", str(tiny_dir), "--baseline", str(other), "--out", str(tmp_path / "o"), "--skip-accuracy")
    assert r.returncode == 2 and "error:" in r.stderr and "layers 4 vs 2" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(UserError, match="not the dense version"):
        check_same_architecture({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4},
                                {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 4}, "s", "d")
    assert not (tmp_path / "o").exists()


def test_missing_runtime_requested_is_error_else_skipped(monkeypatch):
    import importlib.util as iu

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "deepsparse" else real(name, *a))
    with pytest.raises(UserError, match="runtime 'deepsparse' was requested but deepsparse is not installed"):
        select_runtimes(["deepsparse"])
    run, skipped = select_runtimes(None)
    assert "deepsparse" not in run and "deepsparse" in skipped and "tensorrt" in skipped


def test_option_parsing_errors():
    assert parse_int_list("128, 512", "--prompt-lens") == [128, 512]
    with pytest.raises(UserError):
        parse_int_list("128,x", "--prompt-lens")
    with pytest.raises(UserError):
        parse_int_list("0", "--prompt-lens")
    with pytest.raises(UserError, match="unknown runtime"):
        parse_runtimes("onnxruntime,tensorflow")
    assert parse_runtimes("onnxruntime,onnxruntime") == ["onnxruntime"]
    from losa_deploy.bench.run import split_variants

    rts = parse_runtimes("onnxruntime:dense,sparse-cpu,deepsparse:sparse,deepsparse:dense")
    assert split_variants(rts) == (["onnxruntime", "sparse-cpu", "deepsparse"],
                                   {"onnxruntime": ("dense",), "sparse-cpu": ("dense", "sparse"),
                                    "deepsparse": ("dense", "sparse")})
    assert split_variants(None) == (None, {})
    with pytest.raises(UserError, match=":dense or :sparse"):
        parse_runtimes("onnxruntime:both")
    with pytest.raises(UserError, match="unknown runtime"):
        parse_runtimes("tvm:dense")


def test_bad_inputs_are_user_errors(tmp_path, tiny_dir):
    with pytest.raises(UserError, match="not a model directory"):
        run_bench(BenchOptions(sparse_dir=tmp_path, baseline=str(tiny_dir), out=tmp_path / "o"))
    with pytest.raises(UserError, match="--baseline is required"):
        run_bench(BenchOptions(sparse_dir=tiny_dir, baseline=None, out=tmp_path / "o"))
    with pytest.raises(UserError, match="--repeats"):
        run_bench(BenchOptions(sparse_dir=tiny_dir, baseline=str(tiny_dir), out=tmp_path / "o", repeats=0))


def test_memory_check_for_interleaved_runners(tmp_path, monkeypatch):
    """All runners of a shape are alive together: their weights must fit in the available memory, else a UserError."""
    import psutil

    from losa_deploy.bench.run import check_memory, side_bytes

    a, b = tmp_path / "a", tmp_path / "b"
    for d, n in ((a, 3000), (b, 1000)):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * n)
        (d / "sparsity_masks.safetensors").write_bytes(b"x" * 500)  # not loaded by runners
        (d / "config.json").write_text("{}")
    assert side_bytes(a) == 3000
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 10_000})())
    assert check_memory({"x/dense": a, "y/sparse": b}, "model") == {"x/dense": 3000, "y/sparse": 1000}
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 5_000})())
    with pytest.raises(UserError, match="pass fewer --runtimes"):
        check_memory({"x/dense": a, "y/sparse": b}, "model")  # 4000 B > 70% of 5000 B


# ---- synthetic 7B-shaped blocks (at tiny shapes) ----------------------------------------------------------------

def test_shape_pair_builder(tmp_path, monkeypatch):
    from losa_deploy.bench import shapes

    monkeypatch.setitem(shapes.SHAPES, "tiny", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                     num_key_value_heads=4, full_layers=8, full_vocab=2048,
                                                     rms_norm_eps=1e-5, rope_theta=1e4))
    rates = {k: 0.5 for k in shapes.LINEARS} | {"mlp.down_proj": 0.75}
    info = shapes.build_shape_pair(tmp_path / "s", shape="tiny", blocks=2, rates=rates)
    assert info["settings"]["vocab_size"] == 2048 * 2 // 8
    from safetensors.torch import load_file

    d = load_file(str(tmp_path / "s" / "dense" / "model.safetensors"))
    s = load_file(str(tmp_path / "s" / "sparse" / "model.safetensors"))
    masks = load_file(str(tmp_path / "s" / "sparse" / "sparsity_masks.safetensors"))
    w = s["model.layers.1.mlp.down_proj.weight"]
    assert float((w == 0).float().mean()) == pytest.approx(0.75)
    assert ((w != 0) == masks["model.layers.1.mlp.down_proj.weight"].bool()).all()
    assert float((s["model.layers.0.self_attn.q_proj.weight"] == 0).float().mean()) == pytest.approx(0.5)
    kept = masks["model.layers.0.mlp.up_proj.weight"].bool()
    dw = d["model.layers.0.mlp.up_proj.weight"]
    # magnitude per row: every kept weight is at least as large as every pruned one in its row
    smallest_kept = dw.abs().masked_fill(~kept, float("inf")).min(1).values
    assert (smallest_kept >= dw.abs().masked_fill(kept, 0).max(1).values).all()
    assert (s["lm_head.weight"] != 0).all()  # lm_head dense
    got = shapes.linear_rates_from_model(tmp_path / "s" / "sparse")
    assert got["mlp.down_proj"] == pytest.approx(0.75) and got["self_attn.k_proj"] == pytest.approx(0.5)
    again = shapes.build_shape_pair(tmp_path / "s", shape="tiny", blocks=2, rates=rates)  # cached
    assert again["settings"] == info["settings"]
    with pytest.raises(UserError):
        shapes.shape_config("gpt-5", 2)


def test_llama7b_shape_config():
    from losa_deploy.bench.shapes import mean_rate, scaled_vocab, shape_config

    c = shape_config("llama-2-7b", 2)
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers) == (4096, 11008, 32, 2)
    assert c.vocab_size == scaled_vocab("llama-2-7b", 2) == 2000
    assert mean_rate({k: 0.7 for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}) == pytest.approx(0.7)


# ---- a real bench of a tiny exported model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny Llama (dense) and its 60% magnitude-pruned copy (per row), with a masks file as compress writes."""
    import torch
    from safetensors.torch import save_file
    from tiny import byte_tokenizer, tiny_model

    from losa_deploy.pruning.masks import unstructured_row_mask

    root = tmp_path_factory.mktemp("benchpair")
    m = tiny_model("llama", layers=2)
    m.save_pretrained(root / "dense")
    byte_tokenizer().save_pretrained(root / "dense")
    masks = {}
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                k = unstructured_row_mask(mod.weight.abs(), 0.6)
                mod.weight.mul_(k)
                masks[f"{name}.weight"] = k.to(torch.uint8)
    m.save_pretrained(root / "sparse")
    byte_tokenizer().save_pretrained(root / "sparse")
    save_file(masks, str(root / "sparse" / "sparsity_masks.safetensors"))
    return root / "dense", root / "sparse"


@pytest.mark.skipif(not HAS_RUNNERS, reason="exporters/runners not available yet")
def test_bench_tiny_exported_model(tiny_pair, tmp_path, text_file):
    dense, sparse = tiny_pair
    rts = "onnxruntime,deepsparse" if HAS_DS else "onnxruntime"
    out = tmp_path / "bench"
    r = cli("bench", str(sparse), "--baseline", str(dense), "--out", str(out), "--runtimes", rts, "--threads", "1",
            "--prompt-lens", "16,32", "--decode-past", "16", "--decode-tokens", "4", "--gen-tokens", "4",
            "--warmup", "1", "--repeats", "2", "--ppl-data", str(text_file), "--ppl-seqlen", "64",
            "--ppl-max-tokens", "256")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"report: {out / 'report.json'}" in r.stdout.replace("\n", "")
    rep = R.load_report(out)
    suite = rep["suites"][0]
    ort = suite["runtimes"]["onnxruntime"]
    assert ort["status"] == "ok", ort
    for var in ("dense", "sparse"):
        ph = ort[var]["phases"]
        assert {"prefill_16", "prefill_32", "ttft", "decode", "e2e_4"} <= set(ph)
        assert all(p["median_s"] > 0 and p["repeats"] == 2 for p in ph.values())
        assert ort[var]["threads"] == 1
    assert suite["speedups"]["onnxruntime vs onnxruntime dense"]["decode"] > 0
    assert 0.55 < suite["sparsity"] < 0.65
    if HAS_DS:
        assert suite["runtimes"]["deepsparse"]["status"] == "ok", suite["runtimes"]["deepsparse"]
        assert suite["headline"] == "deepsparse vs onnxruntime dense"
    ppl = rep["accuracy"]["perplexity"]
    assert ppl["dense"]["perplexity"] > 1 and ppl["sparse"]["perplexity"] > 1
    assert suite["bounds"]["sparse"]["decode"]["work"] < suite["bounds"]["dense"]["decode"]["work"]
    assert (out / "report.md").is_file() and (out / "plots" / "speedup.png").is_file()


HAS_SPARSE_CPU = importlib.util.find_spec("losa_deploy.sparse_cpu.runtime") is not None and \
    importlib.util.find_spec("exporters.sparse_cpu_export") is not None


@pytest.mark.skipif(not HAS_SPARSE_CPU, reason="sparse-cpu runtime/exporter not in this install")
def test_bench_tiny_sparse_cpu(tiny_pair, tmp_path, monkeypatch):
    """sparse-cpu end to end on a tiny pair: exports, interleaved sides, headline vs the fastest dense side, its
    packed-format bound and the per-linear kernel timing. Machine probes are stubbed (they are not under test)."""
    from losa_deploy.bench import kernels
    from losa_deploy.bench.run import sparse_cpu_available

    ok, why = sparse_cpu_available()
    if not ok:
        pytest.skip(f"sparse-cpu unavailable: {why}")
    monkeypatch.setattr(B, "measure_peak_flops", lambda threads: {"flops_per_s": 5e10, "method": "stub"})
    monkeypatch.setattr(B, "measure_bandwidth", lambda threads=None: {"bytes_per_s": 1e10, "method": "stub"})
    monkeypatch.setattr(kernels, "MAX_FLUSH", 1 << 20)
    from losa_deploy.bench import shapes

    monkeypatch.setitem(shapes.SHAPES, "tiny", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                     num_key_value_heads=4, full_layers=8, full_vocab=4096,
                                                     rms_norm_eps=1e-5, rope_theta=1e4))
    dense, sparse = tiny_pair
    out = tmp_path / "bench"
    rep, paths = run_bench(BenchOptions(sparse_dir=sparse, baseline=str(dense), out=out, runtimes=["sparse-cpu"],
                                        threads=1, prompt_lens=(16,), decode_past=16, decode_tokens=4, gen_tokens=0,
                                        warmup=0, repeats=3, skip_accuracy=True, progress=False,
                                        shapes="tiny", blocks=1, sparsity=0.5))
    assert [s["name"] for s in rep["suites"]] == ["model", "shapes:tinyx1"]
    sh = rep["suites"][1]  # --shapes on sparse-cpu: the synthetic sparse checkpoint is packed from its masks
    assert sh["runtimes"]["sparse-cpu"]["status"] == "ok", sh["runtimes"]["sparse-cpu"]
    sh_man = json.loads((Path(sh["sparse_cpu_exports"]["sparse"]) / "export_manifest.json").read_text())
    assert sh_man["masks_from"] == "sparsity_masks.safetensors"
    assert {v["kind"] for v in sh_man["linears"].values()} == {"bitmask"}
    assert sh["kernels"]["linears"]["mlp.up_proj"]["decode"]["sparsity"] == pytest.approx(0.5)
    suite = rep["suites"][0]
    sc = suite["runtimes"]["sparse-cpu"]
    assert sc["status"] == "ok", sc
    assert Path(sc["sparse"]["model_path"]) == out / "exports" / "model" / "sparse" / "sparse-cpu"
    man = json.loads((Path(sc["sparse"]["model_path"]) / "export_manifest.json").read_text())
    assert man["format"] == "sparse-cpu"
    hl = "sparse-cpu vs fastest dense"
    assert suite["headline"] == hl and set(suite["speedup_stats"][hl]) == {"prefill_16", "ttft", "decode"}
    st = suite["speedup_stats"][hl]["decode"]
    assert st["base"] == "sparse-cpu/dense" and st["paired"] and st["pairs"] == 3
    d, sp = sc["dense"]["phases"]["decode"]["samples_s"], sc["sparse"]["phases"]["decode"]["samples_s"]
    assert st["ratios"] == pytest.approx([a / b for a, b in zip(d, sp)])
    assert isinstance(suite["headline_quotable"], bool) and isinstance(rep["flags"], list)
    # sparse-cpu is judged against its packed bytes, which exceed the ideal bitmask encoding by the row pointers
    assert suite["bounds"]["sparse-cpu"]["decode"]["work"] > suite["bounds"]["sparse"]["decode"]["work"]
    pob = suite["percent_of_bound"]["sparse-cpu"]["sparse"]["decode"]
    b = suite["bounds"]["sparse-cpu"]["decode"]["seconds"] * 4
    assert pob == pytest.approx(100 * b / sc["sparse"]["phases"]["decode"]["median_s"])
    k = suite["kernels"]
    assert set(k["linears"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    q = k["linears"]["self_attn.q_proj"]
    assert q["decode"]["layers"] == 2 and q["decode"]["percent_of_bound"] > 0 and q["prefill_16"]["flops"] > 0
    assert 0.55 < q["decode"]["sparsity"] < 0.65
    assert k["total"]["decode"]["share_of_step"] > 0
    md = Path(paths["md"]).read_text()
    assert "sparse-cpu vs fastest dense (headline)" in md and "kernels per linear" in md
