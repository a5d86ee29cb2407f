"""Shared pieces of every exporter: read a model directory and its masks (through losa_deploy.artifact), map ONNX
initializers back to parameters, and check that pruned weights stay zero in the exported file.

Why value-based mapping: the TorchScript exporter folds `x @ W.T` into a MatMul with a transposed constant
named `onnx::MatMul_123`, so names cannot be trusted; values (in either orientation) can.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from losa_deploy.artifact import export_masks, has_manifest, named_weights
from losa_deploy.errors import UserError

EXPORT_SCHEMA = "losa-deploy/export"
EXPORT_VERSION = 1


def check_model_dir(model_dir: str | Path) -> Path:
    """A local HF causal-LM directory (config.json + weights), else a one-line UserError."""
    p = Path(model_dir).expanduser()
    if not p.exists():
        raise UserError(f"model directory '{model_dir}' not found")
    if not p.is_dir():
        raise UserError(f"'{model_dir}' is a file, not a model directory (expected config.json + *.safetensors)")
    if not (p / "config.json").is_file():
        raise UserError(f"'{model_dir}' has no config.json: not a Hugging Face model directory")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise UserError(f"'{model_dir}' has no weights (*.safetensors): not a complete model directory")
    from losa_deploy.model_parts import require_linear_blocks_config
    from losa_deploy.models import load_config

    # UserError for a non-causal-LM architecture, or blocks without nn.Linear (nothing to check zeros in)
    require_linear_blocks_config(load_config(str(p)))
    return p


def load_source(
    model_dir: str | Path, dtype: str = "float32", attn_implementation: str | None = "eager"
) -> tuple[Any, Any]:
    from losa_deploy.models import load_model

    return load_model(str(model_dir), dtype=dtype, device="cpu", attn_implementation=attn_implementation)


def linear_weights(model: Any) -> dict[str, Any]:
    """{parameter name: weight} for every nn.Linear inside the decoder blocks (what pruning touches)."""
    import torch.nn as nn

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and "lm_head" not in name:
            out[f"{name}.weight"] = mod.weight
    return out


def load_masks(model_dir: Path, model: Any) -> tuple[dict[str, np.ndarray], str]:
    """Keep-masks (True = keep) for the block linears, checked against the weights (`artifact.export_masks`)."""
    return export_masks(model_dir, linear_weights(model), named_weights(model))


def sparsity(a: np.ndarray) -> float:
    return float(1.0 - np.count_nonzero(a) / a.size) if a.size else 0.0


def _fingerprint(a: np.ndarray) -> tuple:
    a64 = a.astype(np.float64)
    return (tuple(sorted(a.shape)), round(float(np.abs(a64).sum()), 2))


def map_initializers(onnx_model: Any, params: dict[str, np.ndarray], base_dir: Path | None = None) -> dict[str, dict]:
    """Find, for each parameter, the 2-D initializer that holds it (same or transposed, any float dtype).

    Returns {param: {"initializer": name, "transposed": bool, "array": np.ndarray (in the parameter's layout)}}.
    """
    from onnx import numpy_helper

    by_fp: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for init in onnx_model.graph.initializer:
        if len(init.dims) != 2:
            continue
        arr = numpy_helper.to_array(init, base_dir=str(base_dir) if base_dir else "")
        if arr.dtype.kind != "f":
            continue
        by_fp.setdefault(_fingerprint(arr.astype(np.float32)), []).append((init.name, arr))
    found: dict[str, dict] = {}
    for pname, w in params.items():
        cands = by_fp.get(_fingerprint(w.astype(np.float32)), [])
        if not cands:  # fp16 rounding moves the sum: fall back to the shape bucket
            shape_key = tuple(sorted(w.shape))
            cands = [c for k, v in by_fp.items() if k[0] == shape_key for c in v]
        for iname, arr in cands:
            for transposed, view in ((False, arr), (True, arr.T)):
                if view.shape == w.shape and np.allclose(
                    view.astype(np.float32), w.astype(view.dtype).astype(np.float32), rtol=0, atol=0
                ):
                    found[pname] = {"initializer": iname, "transposed": transposed, "array": view}
                    break
            if pname in found:
                break
    return found


def check_zero_patterns(onnx_model: Any, model: Any, masks: dict[str, np.ndarray], base_dir: Path | None = None,
                        dtype: Any = np.float32) -> dict:
    """Every pruned weight (mask False) must be exactly zero in its ONNX initializer."""
    params = {k: v.detach().cpu().numpy().astype(dtype) for k, v in linear_weights(model).items()}
    mapped = map_initializers(onnx_model, params, base_dir)
    missing = sorted(set(params) - set(mapped))
    violations = []
    layers = {}
    for pname, info in mapped.items():
        arr = info["array"]
        m = masks[pname]
        bad = int(np.count_nonzero(arr[~m]))
        if bad:
            violations.append({"param": pname, "nonzero_where_pruned": bad})
        layers[pname] = {"initializer": info["initializer"], "transposed": info["transposed"],
                         "mask_sparsity": round(sparsity(m), 6), "onnx_sparsity": round(sparsity(arr), 6)}
    return {"ok": not violations and not missing, "checked": len(mapped), "missing": missing,
            "violations": violations, "layers": layers}


def copy_tokenizer_and_config(model_dir: Path, tok: Any, config: Any, out: Path) -> None:
    config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("sparsity_config", None)  # vLLM rejects it; we never write it
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok.save_pretrained(out)
    gc = Path(model_dir) / "generation_config.json"
    if gc.is_file():
        (out / "generation_config.json").write_text(gc.read_text())


def versions() -> dict[str, str]:
    import importlib.metadata as md

    v = {}
    for p in ("losa-deploy", "torch", "transformers", "onnx", "onnxruntime", "optimum-onnx", "deepsparse"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return v


def base_manifest(fmt: str, model_dir: Path, mask_source: str) -> dict:
    return {"schema": EXPORT_SCHEMA, "version": EXPORT_VERSION, "format": fmt, "source": str(Path(model_dir).resolve()),
            "source_manifest": has_manifest(model_dir), "masks_from": mask_source, "versions": versions(),
            "created_unix": int(time.time())}
