"""sparse-cpu's kernels per linear, in isolation: how close each packed matrix product comes to its own bound.

For each block-linear kind (q_proj ... down_proj), the sparse model's weights of every layer are packed from the
explicit masks as the sparse-cpu export packs them (`kinds`: the export manifest's per-linear kind, so a linear the
exporter kept dense is timed dense), then timed through the kernel library (losa_deploy/sparse_cpu/_lib.py):
- decode: one `sp_gemv` per layer, swept over all layers of that kind, after evicting the caches (a read of a buffer
  larger than the last-level cache), as a decode step streams them; bound = bytes streamed (values + masks +
  row_ptr) / measured bandwidth;
- prefill: one `sp_gemm` of a [P, in] input per layer; bound = 2 P nnz / measured peak FLOP/s.
Each figure is the median sweep over `repeats` (after a warm-up sweep); `percent_of_bound` = 100 x bound / time.
"""

from __future__ import annotations

import ctypes
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..artifact import MASKS_NAME, read_export_manifest, weight_files
from .pairs import median

MAX_FLUSH = 512 * 2**20  # some VMs report a host-sized LLC; reading more than this per sweep only costs time
_KIND_RE = re.compile(r"\.(\d+)\.((?:self_attn|mlp)\.[a-z_]+)\.weight$")


def _llc_bytes() -> int:
    """Last-level cache size from sysfs (the largest 'index*' cache), 32 MiB when unknown."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            txt = (d / "size").read_text().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 * 2**20


def linear_kinds(export_dir: Path | None) -> dict[str, dict[str, Any]]:
    """{"model.layers.0.self_attn.q_proj": {"kind": "bitmask" | "nm" | "dense", "pattern": "2:4" | ...}} from a
    sparse-cpu export manifest, or {} (then every masked linear is timed as an unstructured bitmask)."""
    if export_dir is None:
        return {}
    lin = read_export_manifest(export_dir).get("linears") or {}
    return {name: info for name, info in lin.items() if isinstance(info, dict)}


def load_packed_linears(sparse_dir: Path, kinds: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    """{kind "self_attn.q_proj": [PackedMatrix per layer, in layer order]} packed from weights + explicit masks."""
    from safetensors import safe_open

    from ..errors import UserError
    from ..sparse_cpu.pack import pack_bitmask, pack_dense, pack_nm

    masks_f = Path(sparse_dir) / MASKS_NAME
    if not masks_f.is_file():
        raise UserError(f"'{sparse_dir}' has no {MASKS_NAME}: the kernels pack from explicit masks")
    by_kind: dict[str, list[tuple[int, Any]]] = {}
    with safe_open(str(masks_f), framework="numpy") as mf:
        mask_names = set(mf.keys())
        for wf in weight_files(sparse_dir):
            with safe_open(str(wf), framework="pt") as fh:
                for name in fh.keys():
                    m = _KIND_RE.search(name)
                    if not m:
                        continue
                    w = fh.get_tensor(name).float().numpy()
                    info = kinds.get(name[: -len(".weight")]) or {}
                    if name not in mask_names or info.get("kind") == "dense":
                        p = pack_dense(w)
                    else:
                        keep = mf.get_tensor(name).astype(bool)
                        if info.get("kind") == "nm":
                            n, mm = (int(v) for v in str(info.get("pattern")).split(":"))
                            p = pack_nm(w, keep, n, mm)
                        else:
                            p = pack_bitmask(w, keep)
                    by_kind.setdefault(m.group(2), []).append((int(m.group(1)), p))
    return {k: [p for _, p in sorted(v, key=lambda t: t[0])] for k, v in by_kind.items()}


def _sweep_timer(lib: Any, mats: Sequence[Any], x: np.ndarray, ys: list[np.ndarray], gemm_t: int | None,
                 flush: np.ndarray | None) -> Callable[[], float]:
    """A function that evicts the caches (untimed) and returns the seconds of one product per matrix."""
    structs = [m.struct() for m in mats]
    refs = [ctypes.byref(s) for s in structs]
    xp = x.ctypes.data
    yps = [y.ctypes.data for y in ys]

    def run() -> float:
        if flush is not None:
            float(flush.sum())
        t0 = time.perf_counter()
        if gemm_t is None:
            for r, yp in zip(refs, yps):
                lib.sp_gemv(r, xp, yp)
        else:
            for r, yp in zip(refs, yps):
                lib.sp_gemm(r, xp, gemm_t, yp)
        dt = time.perf_counter() - t0
        _ = structs  # keep the structs (and the arrays they point into) alive
        return dt

    return run


def time_linears(
    sparse_dir: Path, *, export_dir: Path | None, threads: int, prompt_len: int | None, bytes_per_s: float,
    flops_per_s: float, repeats: int = 5, warmup: int = 1, flush_bytes: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """{"method", "threads", "prompt_len", "linears": {kind: {"decode": {...}, "prefill_<P>": {...}}}, "total": ...}."""
    from ..sparse_cpu import _lib

    lib = _lib.load()
    _lib.set_threads(threads)
    step = on_step or (lambda _m: None)
    step("packing linears for the kernel timing")
    packed = load_packed_linears(Path(sparse_dir), linear_kinds(export_dir))
    nflush = flush_bytes if flush_bytes is not None else min(2 * _llc_bytes(), MAX_FLUSH)
    flush = np.ones(max(nflush // 4, 1), dtype=np.float32) if nflush > 0 else None
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"linears": {}}
    totals: dict[str, dict[str, float]] = {}
    for kind, mats in packed.items():
        rows, cols = mats[0].rows, mats[0].cols
        phases: dict[str, dict[str, Any]] = {}
        nbytes = sum(m.nbytes for m in mats)
        nnz = sum(m.nnz for m in mats)
        jobs: list[tuple[str, int | None]] = [("decode", None)]
        if prompt_len:
            jobs.append((f"prefill_{prompt_len}", prompt_len))
        for phase, t in jobs:
            step(f"kernel timing: {kind} {phase}")
            x = rng.standard_normal(cols if t is None else (t, cols)).astype(np.float32)
            ys = [np.empty(rows if t is None else (t, m.rows), dtype=np.float32) for m in mats]
            run = _sweep_timer(lib, mats, x, ys, t, flush)
            for _ in range(warmup):
                run()
            samples = [run() for _ in range(repeats)]
            med = median(samples)
            if t is None:
                bound = nbytes / bytes_per_s
                d = {"bytes": float(nbytes)}
            else:
                bound = 2.0 * t * nnz / flops_per_s
                d = {"flops": 2.0 * t * nnz}
            d.update({"median_s": med, "min_s": min(samples), "samples_s": samples, "bound_s": bound,
                      "percent_of_bound": 100.0 * bound / med if med > 0 else None, "layers": len(mats),
                      "shape": [rows, cols], "kinds": sorted({m.kind for m in mats}),
                      "sparsity": 1.0 - nnz / (len(mats) * rows * cols)})
            phases[phase] = d
            tot = totals.setdefault(phase, {"median_s": 0.0, "bound_s": 0.0})
            tot["median_s"] += med
            tot["bound_s"] += bound
        out["linears"][kind] = phases
    for tot in totals.values():
        tot["percent_of_bound"] = 100.0 * tot["bound_s"] / tot["median_s"] if tot["median_s"] > 0 else None
    out["total"] = totals
    out.update({"threads": threads, "prompt_len": prompt_len, "repeats": repeats, "warmup": warmup,
                "isa": _lib.get_isa(), "flush_bytes": nflush,
                "method": f"each linear kind swept over its {len(next(iter(packed.values()), []))} layers through "
                          f"sp_gemv (decode) / sp_gemm (prefill, {prompt_len} rows), {threads} threads, "
                          f"{_lib.get_isa()} kernels, caches evicted before each sweep ({nflush >> 20} MiB read), "
                          f"median of {repeats}"})
    return out
