"""`--format hf`: a compact copy of a sparse checkpoint (bitmask + non-zero values in safetensors) and the loader
that restores the dense tensors bit-exactly.

Layout of model.compact.safetensors, for each compressed weight W [N, K]:
  "<name>::bitmask"  uint8, np.packbits of (W != 0) flattened row-major
  "<name>::values"   W's non-zeros in row-major order, original dtype
  "<name>::shape"    int64 [N, K]
every other tensor is stored as-is under its own name. A 70% sparse fp32 linear takes 0.3*4 + 1/8 = 1.33 bytes
per weight instead of 4.
"""

from __future__ import annotations


import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from losa_deploy.artifact import EXPORT_MANIFEST_NAME, check_masks, weight_files, write_export_manifest
from losa_deploy.atomic import atomic_dir
from losa_deploy.errors import UserError

from .common import base_manifest, check_model_dir

COMPACT_FILE = "model.compact.safetensors"
MIN_SPARSITY = 0.2  # below this, a bitmask + values is larger than the dense tensor for fp16/bf16; keep dense
_SEP = "::"


def compress_tensor(w: np.ndarray) -> dict[str, np.ndarray]:
    nz = w != 0
    return {"bitmask": np.packbits(nz.reshape(-1)), "values": w[nz], "shape": np.array(w.shape, dtype=np.int64)}


def decompress_tensor(bitmask: np.ndarray, values: np.ndarray, shape: np.ndarray) -> np.ndarray:
    n = int(np.prod(shape))
    nz = np.unpackbits(bitmask, count=n).astype(bool)
    out = np.zeros(n, dtype=values.dtype)
    out[nz] = values
    return out.reshape(tuple(int(s) for s in shape))


def _read_state(model_dir: Path) -> dict[str, Any]:
    import torch

    from losa_deploy.artifact import read_weights

    return {k: v for k, v in read_weights(model_dir).items() if isinstance(v, torch.Tensor)}


def export_compact(model_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> dict:
    import torch
    from safetensors.torch import save_file

    src = check_model_dir(model_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists; pass --overwrite or choose another --out")
    t0 = time.perf_counter()
    state = _read_state(src)
    check_masks(src, state)  # masks are the contract: refuse weights that left them
    dense_bytes = sum(f.stat().st_size for f in weight_files(src))
    packed: dict[str, torch.Tensor] = {}
    compressed = []
    for name, t in state.items():
        a = t.contiguous()
        if a.dim() == 2 and a.is_floating_point():
            zeros = 1.0 - float((a != 0).sum()) / a.numel()
            if zeros >= MIN_SPARSITY:
                nz = a != 0
                packed[f"{name}{_SEP}bitmask"] = torch.from_numpy(np.packbits(nz.reshape(-1).numpy()))
                packed[f"{name}{_SEP}values"] = a[nz].contiguous()
                packed[f"{name}{_SEP}shape"] = torch.tensor(list(a.shape), dtype=torch.int64)
                compressed.append(name)
                continue
        packed[name] = a
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(packed, str(tmp / COMPACT_FILE), metadata={"format": "losa-deploy/compact-bitmask", "version": "1"})
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != EXPORT_MANIFEST_NAME \
                    and not f.name.endswith(".index.json"):
                shutil.copy2(f, tmp / f.name)
        # round trip check: every tensor restored bit-exactly
        restored = load_compact_state(tmp)
        exact = set(restored) == set(state) and all(torch.equal(restored[k], state[k]) for k in state)
        if not exact:
            raise UserError("compact round trip is not exact; this is a bug, please report it")
        compact_bytes = (tmp / COMPACT_FILE).stat().st_size
        man = base_manifest("hf", src, "weights != 0 (bitmask)")
        man.update({
            "files": {"weights": COMPACT_FILE}, "compressed_tensors": len(compressed), "dense_tensors": len(state) - len(compressed),
            "min_sparsity_to_compress": MIN_SPARSITY,
            "sizes": {"dense_bytes": dense_bytes, "compact_bytes": compact_bytes, "ratio": compact_bytes / max(dense_bytes, 1)},
            "verification": {"round_trip_exact": exact},
            "load": "from exporters.hf_compact import load_compact; model = load_compact(DIR)",
            "timings": {"total_s": round(time.perf_counter() - t0, 3)},
        })
        write_export_manifest(tmp, man)
    return man


def load_compact_state(path: str | Path) -> dict[str, Any]:
    """The dense state dict (torch tensors) of a compact directory."""
    import torch
    from safetensors.torch import load_file

    f = Path(path) / COMPACT_FILE
    if not f.is_file():
        raise UserError(f"'{path}' has no {COMPACT_FILE}: not a compact export (losa-deploy export DIR --format hf)")
    raw = load_file(str(f))
    state: dict[str, Any] = {}
    for k, v in raw.items():
        if _SEP not in k:
            state[k] = v
    for k in raw:
        if k.endswith(f"{_SEP}bitmask"):
            name = k[: -len(f"{_SEP}bitmask")]
            shape = tuple(int(s) for s in raw[f"{name}{_SEP}shape"].tolist())
            n = int(np.prod(shape))
            nz = torch.from_numpy(np.unpackbits(raw[k].numpy(), count=n).astype(bool))
            vals = raw[f"{name}{_SEP}values"]
            dense = torch.zeros(n, dtype=vals.dtype)
            dense[nz] = vals
            state[name] = dense.reshape(shape)
    return state


def load_compact(path: str | Path, dtype: Any = None) -> Any:
    """A ready HF causal LM (eval mode) from a compact directory; dense tensors restored from bitmask + values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    try:
        cfg = AutoConfig.from_pretrained(str(p))
    except Exception as e:
        raise UserError(f"'{path}' has no readable config.json: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    state = load_compact_state(p)
    model = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise UserError(f"compact checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.eval()



