"""sparse-cpu: an open sparse CPU runtime (C kernels built from source with the machine's gcc, plus an executor).

Modules, each importing only those listed after it: `build` (the `python -m` entry: build, load, report) ->
`runtime` (the whole-model executor) -> `_lib` (loads the library, runs y = W x and Y = X W^T; AVX-512 / AVX2 /
portable, chosen at run time) -> `toolchain` (compiles csrc/ into the cache) and `pack` (a float32 weight and its
explicit keep-mask into the packed format) -> `abi` (the ctypes mirror of sp_matrix).
"""

from __future__ import annotations

from .pack import PackedMatrix, keep_mask, pack, pack_bitmask, pack_dense, pack_nm, unpack

__all__ = ["PackedMatrix", "keep_mask", "pack", "pack_bitmask", "pack_dense", "pack_nm", "unpack"]
