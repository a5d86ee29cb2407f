"""sparse-cpu kernels against a NumPy reference, on every dispatch path and thread count, plus packing.

The kernels define one canonical summation order (see csrc/kernels.c), so the paths must agree bit for bit; the
reference (float64) checks each one within 1e-5 of the magnitude sum |W| |x|.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from losa_deploy.errors import UserError
from losa_deploy.sparse_cpu import _lib, toolchain
from losa_deploy.sparse_cpu.pack import check_nm, keep_mask, pack, pack_bitmask, pack_nm, unpack

ISAS = list(_lib.ISAS)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_settings():
    isa, threads = _lib.get_isa(), _lib.get_threads()
    yield
    _lib.set_isa(isa)
    _lib.set_threads(threads)


def use_isa(name: str) -> None:
    if not _lib.cpu_supports(name):
        pytest.skip(f"this CPU has no {name} (it has {', '.join(_lib.available_isas())})")
    _lib.set_isa(name)


def random_mask(rng, rows: int, cols: int, sparsity: float) -> np.ndarray:
    """Exactly round(sparsity * cols) pruned per row (like Wanda's per-output groups)."""
    keep = cols - int(round(sparsity * cols))
    order = rng.random((rows, cols)).argsort(axis=1)
    return order < keep


def nm_mask(rng, rows: int, cols: int, n: int, m: int) -> np.ndarray:
    order = rng.random((rows, cols // m, m)).argsort(axis=2)
    return (order < n).reshape(rows, cols)


def check_close(got: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """got ~ x @ w.T within 1e-5 relative to |x| @ |w|.T (the sum of magnitudes bounds the rounding)."""
    w64, x64 = w.astype(np.float64), x.astype(np.float64)
    ref = x64 @ w64.T
    scale = np.abs(x64) @ np.abs(w64).T + 1e-30
    err = np.abs(got.astype(np.float64) - ref) / scale
    assert err.max() <= 1e-5, f"relative error {err.max():.2e}"


def run_all(p, x1, xt):
    return _lib.gemv(p, x1), _lib.gemm(p, xt)


SHAPES = [(1, 1), (3, 16), (7, 33), (13, 100), (37, 64), (64, 200)]
SPARSITIES = [0.0, 0.5, 0.7, 0.9, 1.0]


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_bitmask_all_paths_match_reference_and_each_other(rows, cols, sparsity):
    rng = np.random.default_rng(rows * 1000 + cols + int(sparsity * 10))
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    m = random_mask(rng, rows, cols, sparsity)
    p = pack_bitmask(w, m)
    x1 = rng.standard_normal(cols).astype(np.float32)
    xt = rng.standard_normal((17, cols)).astype(np.float32)
    results = {}
    for isa in _lib.available_isas():
        _lib.set_isa(isa)
        y, Y = run_all(p, x1, xt)
        check_close(y[None], w * m, x1[None])
        check_close(Y, w * m, xt)
        results[isa] = (y, Y)
    first = results["portable"]
    for isa, (y, Y) in results.items():
        assert np.array_equal(y, first[0]), f"gemv {isa} differs from portable"
        assert np.array_equal(Y, first[1]), f"gemm {isa} differs from portable"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows,cols", [(5, 7), (37, 100), (64, 576)])
def test_dense_kernels(isa, rows, cols):
    use_isa(isa)
    rng = np.random.default_rng(cols)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    p = pack(w)
    x1 = rng.standard_normal(cols).astype(np.float32)
    xt = rng.standard_normal((3, cols)).astype(np.float32)
    y, Y = run_all(p, x1, xt)
    check_close(y[None], w, x1[None])
    check_close(Y, w, xt)
    _lib.set_isa("portable")
    y0, Y0 = run_all(p, x1, xt)
    assert np.array_equal(y, y0) and np.array_equal(Y, Y0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,m,cols", [(2, 4, 32), (2, 4, 104), (4, 8, 64), (4, 8, 200)])
def test_nm_kernels(isa, n, m, cols):
    use_isa(isa)
    rng = np.random.default_rng(n * m + cols)
    rows = 23
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    mk = nm_mask(rng, rows, cols, n, m)
    p = pack_nm(w, mk, n, m)
    assert p.nnz == rows * cols // m * n
    x1 = rng.standard_normal(cols).astype(np.float32)
    xt = rng.standard_normal((17, cols)).astype(np.float32)
    y, Y = run_all(p, x1, xt)
    check_close(y[None], w * mk, x1[None])
    check_close(Y, w * mk, xt)
    _lib.set_isa("portable")
    y0, Y0 = run_all(p, x1, xt)
    assert np.array_equal(y, y0) and np.array_equal(Y, Y0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("T", [1, 3, 17, 128])
def test_gemm_token_counts(isa, T):
    use_isa(isa)
    rng = np.random.default_rng(T)
    rows, cols = 45, 130
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    m = random_mask(rng, rows, cols, 0.7)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    for p, ref in ((pack_bitmask(w, m), w * m), (pack(w), w)):
        Y = _lib.gemm(p, x)
        assert Y.shape == (T, rows)
        check_close(Y, ref, x)


@pytest.mark.parametrize("isa", ISAS)
def test_threads_do_not_change_results(isa):
    """Big enough to be split over two threads (the split is by rows, so results are identical)."""
    use_isa(isa)
    rng = np.random.default_rng(7)
    rows, cols = 403, 1000
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    m = random_mask(rng, rows, cols, 0.7)
    x1 = rng.standard_normal(cols).astype(np.float32)
    xt = rng.standard_normal((5, cols)).astype(np.float32)
    outs = {}
    for threads in (1, 2):
        _lib.set_threads(threads)
        assert _lib.get_threads() == threads
        outs[threads] = [a for p in (pack_bitmask(w, m), pack(w)) for a in run_all(p, x1, xt)]
    check_close(outs[2][0][None], w * m, x1[None])
    check_close(outs[2][1], w * m, xt)
    for a, b in zip(outs[1], outs[2]):
        assert np.array_equal(a, b)


def test_batch_equals_single_calls():
    rng = np.random.default_rng(3)
    cols = 96
    ws = [rng.standard_normal((r, cols)).astype(np.float32) for r in (64, 21, 21)]
    packed = [pack_bitmask(w, random_mask(rng, *w.shape, 0.7)) for w in ws[:2]] + [pack(ws[2])]
    x1 = rng.standard_normal(cols).astype(np.float32)
    xt = rng.standard_normal((9, cols)).astype(np.float32)
    for p, yb, Yb in zip(packed, _lib.gemv_batch(packed, x1), _lib.gemm_batch(packed, xt)):
        assert np.array_equal(yb, _lib.gemv(p, x1))
        assert np.array_equal(Yb, _lib.gemm(p, xt))


def test_pack_round_trip_and_explicit_mask():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 21)).astype(np.float32)
    m = random_mask(rng, 6, 21, 0.5)
    w[0, np.argmax(m[0])] = 0.0  # a kept weight that is exactly zero stays in the pattern
    w[1, np.argmin(m[1])] = 5.0  # a pruned weight is dropped whatever its value
    p = pack_bitmask(w, m)
    assert np.array_equal(keep_mask(p), m)
    assert p.nnz == int(m.sum())
    assert np.array_equal(unpack(p), np.where(m, w, 0.0).astype(np.float32))
    assert np.array_equal(p.row_ptr, np.concatenate([[0], np.cumsum(m.sum(1))]))
    # bit b of word g is column 16 g + b
    assert p.masks.shape == (6, 2)
    assert all(bool(p.masks[r, c // 16] >> (c % 16) & 1) == m[r, c] for r in range(6) for c in range(21))
    assert np.array_equal(unpack(pack(w)), w)


def test_nm_check_and_input_errors():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 16)).astype(np.float32)
    good = nm_mask(rng, 4, 16, 2, 4)
    check_nm(good, 2, 4)
    bad = good.copy()
    bad[2, 5] = not bad[2, 5]
    with pytest.raises(UserError, match="row 2, inputs 4..7"):
        pack_nm(w, bad, 2, 4)
    with pytest.raises(UserError, match="divisible"):
        pack_nm(w[:, :14], good[:, :14], 2, 4)
    with pytest.raises(UserError, match="not supported"):
        pack_nm(w, good, 2, 3)
    with pytest.raises(UserError, match="boolean"):
        pack_bitmask(w, good.astype(np.float32))
    with pytest.raises(UserError, match="does not match"):
        pack_bitmask(w, good[:, :8])
    with pytest.raises(UserError, match="expected a vector"):
        _lib.gemv(pack(w), np.zeros(15, np.float32))
    with pytest.raises(UserError, match="unknown instruction set"):
        _lib.set_isa("sse9")


def test_environment_forces_a_path():
    code = "from losa_deploy.sparse_cpu import _lib; print(_lib.get_isa())"
    env = {**os.environ, "LOSA_SPARSE_ISA": "portable", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "portable"
    env["LOSA_SPARSE_ISA"] = "sse9"
    code = "from losa_deploy.sparse_cpu import _lib; _lib.load()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "LOSA_SPARSE_ISA=sse9 is not one of" in out.stderr


def test_build_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSA_DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.raises(UserError, match="no C compiler"):
        toolchain.build()
    monkeypatch.delenv("CC")
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "broken.c").write_text("int f(void) { return nope; }\n")
    monkeypatch.setattr(toolchain, "CSRC", src)
    with pytest.raises(UserError, match="building the sparse-cpu kernels failed") as e:
        toolchain.build()
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_build_is_cached_and_keyed_on_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSA_DEPLOY_CACHE", str(tmp_path))
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "a.c").write_text("int f(void) { return 1; }\n")
    monkeypatch.setattr(toolchain, "CSRC", src)
    first = toolchain.build()
    assert first.is_file() and first.parent.parent == tmp_path / "sparse-cpu"
    mtime = first.stat().st_mtime_ns
    assert toolchain.build() == first and first.stat().st_mtime_ns == mtime
    (src / "a.c").write_text("int f(void) { return 2; }\n")
    assert toolchain.build() != first


def test_sequence_runs_each_matrix_like_single_calls():
    rng = np.random.default_rng(5)
    cols = 80
    packed = [pack_bitmask(w, random_mask(rng, 33, cols, 0.7)) for w in rng.standard_normal((3, 33, cols),
                                                                                          dtype=np.float32)]
    for x in (rng.standard_normal(cols, dtype=np.float32), rng.standard_normal((4, cols), dtype=np.float32)):
        seq = _lib.CallSequence(packed, x)
        seq.run()
        for p, y in zip(packed, seq.outs):
            ref = _lib.gemv(p, x) if x.ndim == 1 else _lib.gemm(p, x)
            assert np.array_equal(y, ref)


def test_parallel_runs_every_part_once():
    """sp_parallel (the pool the executor uses for its own loops) runs each part exactly once, on any thread."""
    import ctypes
    import threading

    lib = _lib.load()
    _lib.set_threads(2)
    seen: list[int] = []
    lock = threading.Lock()
    proto = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)

    def part(_arg, p, n):
        assert n == 37
        with lock:
            seen.append(p)

    cb = proto(part)
    lib.sp_parallel.restype = None
    lib.sp_parallel.argtypes = [proto, ctypes.c_void_p, ctypes.c_int]
    for _ in range(3):
        seen.clear()
        lib.sp_parallel(cb, None, 37)
        assert sorted(seen) == list(range(37))


def test_build_entry_reports_the_loaded_library(capsys):
    """`python -m losa_deploy.sparse_cpu.build` (what `make setup` runs): the library path, then what it offers."""
    from losa_deploy.sparse_cpu import build

    assert build.main([]) == 0
    path, facts = capsys.readouterr().out.splitlines()
    assert path == str(toolchain.library_path()) and Path(path).is_file()
    assert f"selected: {_lib.get_isa()}" in facts and ", ".join(_lib.available_isas()) in facts
