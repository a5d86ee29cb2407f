"""sparse-cpu: an open sparse CPU runtime (C kernels built from source with the machine's gcc, plus an executor).

Kernels: `pack` turns a float32 weight and its explicit keep-mask into the packed format; `_lib` runs y = W x and
Y = X W^T on it (AVX-512 / AVX2 / portable, chosen at run time). `build` compiles the library into the cache.
"""

from __future__ import annotations

from .pack import PackedMatrix, keep_mask, pack, pack_bitmask, pack_dense, pack_nm, unpack

__all__ = ["PackedMatrix", "keep_mask", "pack", "pack_bitmask", "pack_dense", "pack_nm", "unpack"]
