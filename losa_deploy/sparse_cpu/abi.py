"""The kernel library's C ABI as ctypes sees it: the `sp_matrix` mirror and the matrix-kind codes (spkernels.h).

Why its own module: `pack` fills these structs, `_lib` passes them to the kernels and `runtime` embeds them in the
executor's model struct; all three import this leaf, so none of them imports another to reach it.
"""

from __future__ import annotations

import ctypes

KINDS = {"dense": 0, "bitmask": 1, "nm": 2}  # sp_matrix.kind


class SpMatrix(ctypes.Structure):
    """Mirror of `sp_matrix` in spkernels.h (field order and types must match)."""

    _fields_ = [
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("kind", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("m", ctypes.c_int32),
        ("masks", ctypes.c_void_p),
        ("row_ptr", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
    ]
