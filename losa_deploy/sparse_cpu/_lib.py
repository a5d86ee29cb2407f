"""ctypes binding of the sparse-cpu kernel library (csrc/spkernels.h): load it, declare its calls, NumPy wrappers.

Why ctypes: no extension module to compile against Python's headers; the library is a plain C ABI that the
whole-model executor links the same way. The wrappers check shapes and dtypes (a wrong one is a UserError) and keep
the NumPy arrays alive for the duration of each call.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError
from .abi import SpMatrix
from .pack import PackedMatrix

ISAS = ("portable", "avx2", "avx512")
ISA_CODES = {"auto": -1, "portable": 0, "avx2": 1, "avx512": 2}
ERRORS = {
    -1: "a NULL pointer or an empty batch",
    -2: "unknown matrix kind",
    -3: "bad shape",
    -4: "bad N:M pattern",
    -5: "values dtype not supported",
    -6: "out of memory",
}


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None

_P = ctypes.POINTER


def _declare(lib: ctypes.CDLL) -> None:
    sig = {
        "sp_gemv": (ctypes.c_int, [_P(SpMatrix), ctypes.c_void_p, ctypes.c_void_p]),
        "sp_gemm": (ctypes.c_int, [_P(SpMatrix), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]),
        "sp_gemv_batch": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
        "sp_gemm_batch": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_void_p]),
        "sp_gemv_seq": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
        "sp_gemm_seq": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                       ctypes.c_void_p]),
        "sp_set_isa": (ctypes.c_int, [ctypes.c_int]),
        "sp_get_isa": (ctypes.c_int, []),
        "sp_cpu_supports": (ctypes.c_int, [ctypes.c_int]),
        "sp_set_threads": (None, [ctypes.c_int]),
        "sp_get_threads": (ctypes.c_int, []),
        "sp_set_spin": (None, [ctypes.c_int]),
        "sp_get_spin": (ctypes.c_int, []),
        "sp_version": (ctypes.c_char_p, []),
        "sp_isa_name": (ctypes.c_char_p, [ctypes.c_int]),
        "sp_kl_rows": (ctypes.c_int, [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.c_void_p, ctypes.c_void_p]),
        "sp_ce_rows": (ctypes.c_int, [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_void_p]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


def load(path: str | Path | None = None) -> ctypes.CDLL:
    """The library, built on first use (see toolchain.py). One instance per process."""
    global _lib
    with _lock:
        if _lib is None:
            if path is None:
                from .toolchain import build

                path = build()
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                raise UserError(f"cannot load the sparse-cpu kernels {path}: {e}") from None
            _declare(lib)
            _lib = lib
    _check_env_isa(_lib)
    return _lib


def _check_env_isa(lib: ctypes.CDLL) -> None:
    """LOSA_SPARSE_ISA is read by the library at load; a value it could not honour is a UserError here."""
    want = os.environ.get("LOSA_SPARSE_ISA", "").strip()
    if not want or want == "auto":
        return
    if want not in ISAS:
        raise UserError(f"LOSA_SPARSE_ISA={want} is not one of auto, {', '.join(ISAS)}")
    if not lib.sp_cpu_supports(ISA_CODES[want]):
        have = [n for n in ISAS if lib.sp_cpu_supports(ISA_CODES[n])]
        raise UserError(f"LOSA_SPARSE_ISA={want}: this CPU does not support it (it has: {', '.join(have)})")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise UserError(f"sparse-cpu {what} failed: {ERRORS.get(rc, f'code {rc}')}")


def set_isa(name: str) -> None:
    """Force a kernel path ('portable', 'avx2', 'avx512') or 'auto'. A path this CPU lacks is a UserError."""
    if name not in ISA_CODES:
        raise UserError(f"unknown instruction set '{name}' (choose from auto, {', '.join(ISAS)})")
    if load().sp_set_isa(ISA_CODES[name]) != 0:
        raise UserError(f"this CPU does not support the '{name}' kernels (it has: {', '.join(available_isas())})")


def get_isa() -> str:
    lib = load()
    return lib.sp_isa_name(lib.sp_get_isa()).decode()


def cpu_supports(name: str) -> bool:
    return bool(load().sp_cpu_supports(ISA_CODES[name]))


def available_isas() -> list[str]:
    return [n for n in ISAS if cpu_supports(n)]


def set_threads(n: int | None) -> None:
    """Kernel threads; None or 0 = all usable cores."""
    load().sp_set_threads(int(n or 0))


def get_threads() -> int:
    return int(load().sp_get_threads())


def set_spin(microseconds: int) -> None:
    load().sp_set_spin(int(microseconds))


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _vector(x: np.ndarray, n: int, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape != (n,):
        raise UserError(f"{what}: expected a vector of {n} values, got shape {x.shape}")
    return x


def gemv(w: PackedMatrix, x: np.ndarray) -> np.ndarray:
    """y = W x for one input vector (decode)."""
    lib = load()
    x = _vector(x, w.cols, "gemv input")
    y = np.empty(w.rows, dtype=np.float32)
    s = w.struct()
    _check(lib.sp_gemv(ctypes.byref(s), _ptr(x), _ptr(y)), "gemv")
    return y


def gemm(w: PackedMatrix, x: np.ndarray) -> np.ndarray:
    """Y = X W^T for X of shape [T, cols] (prefill); returns [T, rows]."""
    lib = load()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != w.cols:
        raise UserError(f"gemm input: expected shape [T, {w.cols}], got {x.shape}")
    y = np.empty((x.shape[0], w.rows), dtype=np.float32)
    s = w.struct()
    _check(lib.sp_gemm(ctypes.byref(s), _ptr(x), x.shape[0], _ptr(y)), "gemm")
    return y


def _batch_args(ws: Sequence[PackedMatrix], outs: list[np.ndarray]):
    structs = [w.struct() for w in ws]
    sp = (ctypes.POINTER(SpMatrix) * len(ws))(*[ctypes.pointer(s) for s in structs])
    yp = (ctypes.c_void_p * len(ws))(*[_ptr(o) for o in outs])
    return structs, sp, yp


def gemv_batch(ws: Sequence[PackedMatrix], x: np.ndarray) -> list[np.ndarray]:
    """[W_i x] for matrices sharing the input, in one parallel dispatch."""
    lib = load()
    if not ws:
        return []
    x = _vector(x, ws[0].cols, "gemv_batch input")
    outs = [np.empty(w.rows, dtype=np.float32) for w in ws]
    _keep, sp, yp = _batch_args(ws, outs)
    _check(lib.sp_gemv_batch(len(ws), sp, _ptr(x), yp), "gemv_batch")
    return outs


def gemm_batch(ws: Sequence[PackedMatrix], x: np.ndarray) -> list[np.ndarray]:
    """[X W_i^T] for matrices sharing the input [T, cols], in one parallel dispatch."""
    lib = load()
    if not ws:
        return []
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != ws[0].cols:
        raise UserError(f"gemm_batch input: expected shape [T, {ws[0].cols}], got {x.shape}")
    outs = [np.empty((x.shape[0], w.rows), dtype=np.float32) for w in ws]
    _keep, sp, yp = _batch_args(ws, outs)
    _check(lib.sp_gemm_batch(len(ws), sp, _ptr(x), x.shape[0], yp), "gemm_batch")
    return outs


class CallSequence:
    """n products on one input, called one after another from C (as the executor does), for timing.

    Holds the ctypes arrays so that `run()` costs one foreign call however many matrices there are."""

    def __init__(self, ws: Sequence[PackedMatrix], x: np.ndarray) -> None:
        self.lib = load()
        self.ws = list(ws)
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.decode = self.x.ndim == 1
        if self.x.shape[-1] != self.ws[0].cols:
            raise UserError(f"sequence input: expected {self.ws[0].cols} columns, got shape {self.x.shape}")
        shape = (lambda w: (w.rows,)) if self.decode else (lambda w: (self.x.shape[0], w.rows))
        self.outs = [np.empty(shape(w), dtype=np.float32) for w in self.ws]
        self._keep, self._sp, self._yp = _batch_args(self.ws, self.outs)

    def run(self) -> None:
        n = len(self.ws)
        if self.decode:
            rc = self.lib.sp_gemv_seq(n, self._sp, _ptr(self.x), self._yp)
        else:
            rc = self.lib.sp_gemm_seq(n, self._sp, _ptr(self.x), self.x.shape[0], self._yp)
        _check(rc, "sequence")
