"""Pack a float32 weight and its explicit keep-mask into the sparse-cpu format (csrc/spkernels.h), and back.

The pattern comes from the mask file, never from the weights: a kept weight that happens to be 0.0 stays in the
pattern (and in `values`), a pruned one is dropped whatever its value.

Layout (row-major W [rows][cols], y = W x): `masks[r, g]` (uint16) has bit b set when W[r, 16 g + b] is kept (the
last group zero-padded); `values` holds the kept weights row by row in column order, row r starting at
`row_ptr[r]`. N:M uses the same arrays; packing checks that every group of M consecutive inputs keeps exactly N.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from .abi import KINDS, SpMatrix

VALUE_PAD = 16  # zero floats after the last value: harmless, and lets a kernel load 16 at a time anywhere


@dataclass
class PackedMatrix:
    """One weight in the kernels' format. `values` is 2-D [rows, cols] for dense, 1-D (nnz + padding) otherwise."""

    kind: str  # "dense" | "bitmask" | "nm"
    rows: int
    cols: int
    values: np.ndarray
    masks: np.ndarray | None = None  # uint16 [rows, groups]
    row_ptr: np.ndarray | None = None  # int64 [rows + 1]
    n: int = 0
    m: int = 0
    _struct: Any = field(default=None, repr=False, compare=False)

    @property
    def groups(self) -> int:
        return -(-self.cols // 16)

    @property
    def nnz(self) -> int:
        return self.rows * self.cols if self.row_ptr is None else int(self.row_ptr[-1])

    @property
    def nbytes(self) -> int:
        """Bytes a kernel streams per product: values (without padding) + masks + row pointers."""
        if self.kind == "dense":
            return self.rows * self.cols * 4
        assert self.masks is not None and self.row_ptr is not None
        return self.nnz * 4 + self.masks.nbytes + self.row_ptr.nbytes

    def struct(self):
        """The ctypes `sp_matrix` pointing into this object's arrays (valid while the object lives)."""
        if self._struct is None:
            s = SpMatrix()
            s.rows, s.cols, s.kind, s.dtype, s.n, s.m = self.rows, self.cols, KINDS[self.kind], 0, self.n, self.m
            s.values = self.values.ctypes.data
            s.masks = None if self.masks is None else self.masks.ctypes.data
            s.row_ptr = None if self.row_ptr is None else self.row_ptr.ctypes.data
            self._struct = s
        return self._struct


def _weight(weight: Any) -> np.ndarray:
    w = np.asarray(weight.detach().cpu() if hasattr(weight, "detach") else weight)
    if w.ndim != 2:
        raise UserError(f"a packed weight must be 2-D [out_features, in_features], got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise UserError(f"a packed weight must be floating point, got {w.dtype}")
    return np.ascontiguousarray(w, dtype=np.float32)


def _mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    m = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
    if m.dtype != np.bool_:
        raise UserError(f"a keep-mask must be boolean (explicit masks only), got {m.dtype}")
    if m.shape != shape:
        raise UserError(f"keep-mask shape {m.shape} does not match the weight's {shape}")
    return m


def pack_dense(weight: Any) -> PackedMatrix:
    w = _weight(weight)
    return PackedMatrix("dense", w.shape[0], w.shape[1], w)


def mask_bits(mask: np.ndarray) -> np.ndarray:
    """bool [rows, cols] -> uint16 [rows, ceil(cols / 16)], bit b of word g = column 16 g + b."""
    rows, cols = mask.shape
    groups = -(-cols // 16)
    padded = np.zeros((rows, groups * 16), dtype=np.bool_)
    padded[:, :cols] = mask
    return np.ascontiguousarray(np.packbits(padded, axis=1, bitorder="little").view("<u2"), dtype=np.uint16)


def mask_from_bits(masks: np.ndarray, cols: int) -> np.ndarray:
    bits = np.unpackbits(np.ascontiguousarray(masks, dtype="<u2").view(np.uint8), axis=1, bitorder="little")
    return bits[:, :cols].astype(np.bool_)


def pack_bitmask(weight: Any, mask: Any) -> PackedMatrix:
    """Unstructured sparsity: bitmask per 16 inputs plus the kept values."""
    w = _weight(weight)
    m = _mask(mask, w.shape)
    rows, cols = w.shape
    row_ptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(m.sum(axis=1), out=row_ptr[1:])
    values = np.zeros(int(row_ptr[-1]) + VALUE_PAD, dtype=np.float32)
    values[: row_ptr[-1]] = w[m]
    return PackedMatrix("bitmask", rows, cols, values, mask_bits(m), row_ptr)


def check_nm(mask: np.ndarray, n: int, m: int) -> None:
    """UserError unless every group of m consecutive inputs keeps exactly n (m in {4, 8})."""
    if m not in (4, 8) or not 1 <= n <= m:
        raise UserError(f"N:M pattern {n}:{m} is not supported (M must be 4 or 8 and 1 <= N <= M)")
    rows, cols = mask.shape
    if cols % m:
        raise UserError(f"N:M {n}:{m} needs in_features divisible by {m}, got {cols}")
    counts = mask.reshape(rows, cols // m, m).sum(axis=2)
    bad = np.argwhere(counts != n)
    if len(bad):
        r, g = bad[0]
        raise UserError(f"mask is not {n}:{m}: row {r}, inputs {g * m}..{g * m + m - 1} keep {counts[r, g]} "
                        f"({len(bad)} such groups)")


def pack_nm(weight: Any, mask: Any, n: int, m: int) -> PackedMatrix:
    """N:M sparsity (2:4, 4:8): the bitmask layout, with the mask checked to be exactly N of every M."""
    w = _weight(weight)
    mk = _mask(mask, w.shape)
    check_nm(mk, n, m)
    p = pack_bitmask(w, mk)
    p.kind, p.n, p.m = "nm", n, m
    return p


def pack(weight: Any, mask: Any | None = None, nm: tuple[int, int] | None = None) -> PackedMatrix:
    """Dense when mask is None; N:M when nm=(n, m) is given; otherwise unstructured bitmask."""
    if mask is None:
        if nm is not None:
            raise UserError("N:M packing needs the explicit keep-mask")
        return pack_dense(weight)
    return pack_nm(weight, mask, *nm) if nm is not None else pack_bitmask(weight, mask)


def keep_mask(p: PackedMatrix) -> np.ndarray:
    """The packed pattern as bool [rows, cols] (all True for dense)."""
    if p.masks is None:
        return np.ones((p.rows, p.cols), dtype=np.bool_)
    return mask_from_bits(p.masks, p.cols)


def unpack(p: PackedMatrix) -> np.ndarray:
    """Dense float32 [rows, cols] with zeros where the pattern drops weights."""
    if p.kind == "dense":
        return np.array(p.values, dtype=np.float32, copy=True)
    out = np.zeros((p.rows, p.cols), dtype=np.float32)
    out[keep_mask(p)] = p.values[: p.nnz]
    return out
