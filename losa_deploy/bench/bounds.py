"""Physical bounds: how fast each phase could possibly run on this machine, so a speed-up can be judged.

- Prefill is compute-bound: bound = FLOPs / peak FLOP/s, peak measured here with a dense fp32 matmul. For the sparse
  model the FLOPs count only non-zero weights (what an ideal sparse kernel does).
- Decode (batch 1) is memory-bound: every step reads every weight once. bound = bytes / bandwidth, bandwidth measured
  here with a large numpy copy (read + write counted). Dense weights cost 4 B/param (fp32); sparse weights are
  counted as a bitmask (1 bit/param) + the non-zero values (4 B each), the smallest plain sparse encoding; a tensor
  is never counted larger than dense. The KV-cache read per step is added to both.

sparse-cpu's own runs are judged against the bytes its packed format really streams (`packed_tensor_bytes`: values +
uint16 masks per 16 inputs + int64 row pointers for the block linears; embeddings row and lm_head dense), and the
same non-zero FLOPs for prefill.

`% of bound` = bound time / measured time: 100% means the runtime reaches the hardware limit.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .timing import measure

FP32 = 4


@dataclass
class TensorInfo:
    name: str
    rows: int
    cols: int
    nnz: int
    role: str  # "block_linear" | "lm_head" | "embedding" | "other"

    @property
    def numel(self) -> int:
        return self.rows * self.cols


@dataclass
class WeightInventory:
    """What a forward pass reads: 2-D weights with their non-zero counts, plus the attention geometry."""

    tensors: list[TensorInfo]
    num_layers: int
    hidden: int
    num_heads: int
    kv_dim: int  # num_key_value_heads * head_dim
    other_params: int = 0  # 1-D tensors (norms, biases): read every step, counted dense

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensors"] = len(self.tensors)
        return d


@dataclass
class Bound:
    phase: str
    work: float  # FLOPs (prefill) or bytes (decode)
    unit: str  # "FLOP" | "B"
    rate: float  # FLOP/s or B/s measured on this machine
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sparse_tensor_bytes(numel: int, nnz: int, value_bytes: int = FP32) -> int:
    """Bitmask + values, never more than the dense encoding."""
    return min(numel * value_bytes, -(-numel // 8) + nnz * value_bytes)


MASK_GROUP = 16  # sparse-cpu's packed format: one uint16 mask per 16 inputs of a row (spkernels.h)
MASK_BYTES = 2
ROW_PTR_BYTES = 8


def packed_tensor_bytes(rows: int, cols: int, nnz: int, value_bytes: int = FP32) -> int:
    """sparse-cpu's packed bitmask format as stored and streamed: kept values + a uint16 mask per 16 inputs of each
    row (the last group zero-padded) + an int64 row pointer per row (+1)."""
    groups = -(-cols // MASK_GROUP)
    return nnz * value_bytes + rows * groups * MASK_BYTES + (rows + 1) * ROW_PTR_BYTES


def decode_bytes(inv: WeightInventory, past: int, sparse: bool, value_bytes: int = FP32,
                 packed: bool = False, dense_linears: frozenset[str] = frozenset()) -> dict[str, float]:
    """Bytes one decode step must move: weights (block linears + lm_head; one embedding row), KV cache, small tensors.

    `packed`: the block linears in sparse-cpu's packed format (`packed_tensor_bytes`), everything else dense (what
    the sparse-cpu runtime streams), except the weights named in `dense_linears` (the export kept them dense);
    otherwise sparse tensors in the ideal bitmask encoding."""
    weights = 0
    for t in inv.tensors:
        if t.role == "embedding":
            weights += t.cols * value_bytes  # one row is gathered
        elif packed:
            weights += (packed_tensor_bytes(t.rows, t.cols, t.nnz, value_bytes)
                        if t.role == "block_linear" and t.name not in dense_linears else t.numel * value_bytes)
        elif sparse:
            weights += sparse_tensor_bytes(t.numel, t.nnz, value_bytes)
        else:
            weights += t.numel * value_bytes
    kv = 2 * inv.num_layers * past * inv.kv_dim * value_bytes
    other = inv.other_params * value_bytes
    return {
        "weights": float(weights),
        "kv_cache": float(kv),
        "other": float(other),
        "total": float(weights + kv + other),
    }


def prefill_flops(inv: WeightInventory, prompt_len: int, sparse: bool) -> dict[str, float]:
    """FLOPs of a prefill of `prompt_len` tokens producing logits for every position (as the runners do).

    Matmuls: 2 * P * (weights used); attention: QK^T and AV over the full P x P square (what the runtimes compute
    with a mask), 2 * 2 * P^2 * hidden per layer. Sparse counts only non-zero weights; attention stays dense.
    """
    p = prompt_len
    lin = 0.0
    for t in inv.tensors:
        if t.role == "embedding":
            continue
        lin += 2.0 * p * (t.nnz if sparse else t.numel)
    attn = 4.0 * p * p * inv.hidden * inv.num_layers
    return {"linear": lin, "attention": attn, "total": lin + attn}


def prefill_bound(inv: WeightInventory, prompt_len: int, sparse: bool, flops_per_s: float) -> Bound:
    f = prefill_flops(inv, prompt_len, sparse)
    return Bound(f"prefill_{prompt_len}", f["total"], "FLOP", flops_per_s, f["total"] / flops_per_s, f)


def decode_bound(inv: WeightInventory, past: int, sparse: bool, bytes_per_s: float, packed: bool = False,
                 dense_linears: frozenset[str] = frozenset()) -> Bound:
    b = decode_bytes(inv, past, sparse, packed=packed, dense_linears=dense_linears)
    return Bound("decode", b["total"], "B", bytes_per_s, b["total"] / bytes_per_s, b)


def percent_of_bound(bound_s: float, measured_s: float) -> float | None:
    if not measured_s or measured_s <= 0 or bound_s is None:
        return None
    return 100.0 * bound_s / measured_s


# ---- inventory from a model directory ---------------------------------------------------------------------------

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|decoder\.layers)\.\d+\.")


def classify(name: str) -> str:
    if "embed_tokens" in name or name.endswith("wte.weight") or "embed_in" in name:
        return "embedding"
    if name.startswith("lm_head") or ".lm_head" in name or "embed_out" in name:
        return "lm_head"
    if _LAYER_RE.search("." + name):
        return "block_linear"
    return "other"


def inventory_from_dir(model_dir: str | Path) -> WeightInventory:
    """Read every weight of an HF checkpoint (safetensors) once and count its non-zeros."""
    from safetensors import safe_open

    from ..artifact import weight_files

    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text())
    files = weight_files(d)
    if not files:
        from ..errors import UserError

        raise UserError(f"'{d}' has no *.safetensors weights: save the model with safe_serialization=True")
    tensors: list[TensorInfo] = []
    other = 0
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name)
                names.add(name)
                if t.dim() == 2:
                    tensors.append(
                        TensorInfo(name, int(t.shape[0]), int(t.shape[1]), int((t != 0).sum()), classify(name))
                    )
                else:
                    other += int(t.numel())
    if not any(t.role == "lm_head" for t in tensors):
        emb = next((t for t in tensors if t.role == "embedding"), None)
        if emb is not None and cfg.get("tie_word_embeddings", True):
            tensors.append(TensorInfo("lm_head.weight(tied)", emb.rows, emb.cols, emb.nnz, "lm_head"))
    return inventory_from_config(cfg, tensors, other)


def inventory_from_config(cfg: dict[str, Any], tensors: list[TensorInfo], other_params: int = 0) -> WeightInventory:
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model"))
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer"))
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head"))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    return WeightInventory(tensors, layers, hidden, heads, kv_heads * head_dim, other_params)


# ---- measured machine rates -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    """Run with `threads` torch threads (None: as set), restoring the previous count; yields the count in use."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _best_s(fn: Callable[[], Any], repeats: int) -> float:
    return measure(fn, warmup=1, repeats=repeats).min_s


def measure_peak_flops(threads: int, n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """Best fp32 GEMM rate (FLOP/s) with `threads` threads: an upper bound any dense or sparse kernel can reach.

    The best of PyTorch's default BLAS and oneDNN: MKL runs its AVX2 code on AMD CPUs, where ONNX Runtime and
    DeepSparse reach about twice MKL's rate, so a torch.mm-only probe is no bound there."""
    import torch

    from ..cpu_gemm import _onednn_linear, onednn_usable

    with _torch_threads(threads):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        kernels = {"torch.mm": lambda: torch.mm(a, b)}
        if onednn_usable():
            kernels["onednn"] = lambda: _onednn_linear(a, b, None)
        rates = {name: 2.0 * n**3 / _best_s(fn, repeats) for name, fn in kernels.items()}
    top = max(rates, key=rates.__getitem__)
    return {"flops_per_s": rates[top], "by_kernel": rates,
            "method": f"fp32 {n}x{n} GEMM, {threads} threads, best of {repeats}, fastest of {', '.join(rates)}: {top}"}


def measure_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5, threads: int | None = None) -> dict[str, Any]:
    """Best large-array memory rate (B/s), arrays far larger than any cache: the faster of a copy (read + write
    counted, one thread) and a multi-threaded read-only reduction. Decode reads weights and writes almost nothing,
    so the read stream is the relevant rate where it is faster."""
    import numpy as np
    import torch

    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    rates = {"copy": 2.0 * src.nbytes / _best_s(lambda: np.copyto(dst, src), repeats)}  # warm-up faults pages in
    del dst
    with _torch_threads(threads) as used:
        t = torch.from_numpy(src)
        rates["read"] = src.nbytes / _best_s(t.sum, repeats)
    del t, src
    gemv = _sparse_cpu_gemv_rate(nbytes, repeats, threads)
    if gemv:
        rates["sparse-cpu dense gemv"] = gemv
    top = max(rates, key=rates.__getitem__)
    return {"bytes_per_s": rates[top], "by_probe": rates,
            "method": f"{nbytes >> 20} MiB, best of {repeats}: numpy copyto (read+write), torch sum "
                      f"(read, {used} threads)" + (", sparse-cpu's dense matrix-vector product (read)" if gemv else "")
                      + f"; fastest: {top}"}


def _sparse_cpu_gemv_rate(nbytes: int, repeats: int, threads: int | None) -> float | None:
    """Read rate of sparse-cpu's own dense fp32 matrix-vector kernel over an `nbytes` matrix, when its library
    builds: a decode kernel can stream faster than a generic reduction, and a bound must not be beaten."""
    try:
        import numpy as np

        from ..sparse_cpu import _lib
        from ..sparse_cpu.pack import pack_dense

        _lib.load()
    except Exception:  # no compiler, no library: the other probes stand
        return None
    cols = 8192
    rows = max(1, nbytes // (4 * cols))
    w = pack_dense(np.ones((rows, cols), dtype=np.float32))
    x = np.ones(cols, dtype=np.float32)
    old = _lib.get_threads()
    _lib.set_threads(threads or 0)
    try:
        return rows * cols * 4 / _best_s(lambda: _lib.gemv(w, x), repeats)
    finally:
        _lib.set_threads(old)


def bounds_for(
    inv: WeightInventory, *, sparse: bool, prompt_lens: Sequence[int], decode_past: int, flops_per_s: float,
    bytes_per_s: float, packed: bool = False, dense_linears: frozenset[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """{phase: bound} for one model; `packed`: decode bytes of sparse-cpu's packed format (prefill FLOPs: non-zeros)."""
    out: dict[str, dict[str, Any]] = {}
    for p in prompt_lens:
        out[f"prefill_{p}"] = prefill_bound(inv, p, sparse or packed, flops_per_s).to_dict()
    out["decode"] = decode_bound(inv, decode_past, sparse, bytes_per_s, packed=packed,
                                 dense_linears=dense_linears).to_dict()
    return out
