"""`--format compressed-tensors` (alias `hf`): a sparse Hugging Face checkpoint in the compressed-tensors format,
written through the library (`ModelCompressor` + a `SparsityCompressionConfig`), never by hand.

Which compressor, and why:
- every compressed linear is 2:4 along its inputs -> `sparse-24-bitmask`: `AutoModelForCausalLM.from_pretrained(DIR,
  dtype="auto")` restores it with no code of ours (transformers builds the model on the meta device first, and only
  the 2:4 compressor can size its tensors there).
- anything else (unstructured, mixed N:M) -> `sparse-bitmask`: a bitmask plus the non-zero values of each weight.
  transformers 4.57 cannot `from_pretrained` it with any compressed-tensors release (0.12-0.14 need the weight's
  values to size the compressed tensors on the meta device; 0.15+ dropped the sparse compressors); the library's own
  `ModelCompressor.decompress` reads it: `load_sparse(DIR)` below is that, four library calls.
Linears below MIN_SPARSITY stay dense (listed in `ignore`): a bitmask would make them larger.

Verification before anything is published: the written directory is decompressed by the library and every tensor is
compared with the source checkpoint (`torch.equal`, same dtype); a mismatch raises and leaves nothing behind.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from losa_deploy.artifact import EXPORT_MANIFEST_NAME, MASKS_NAME, check_masks, named_weights, weight_files
from losa_deploy.artifact import write_export_manifest
from losa_deploy.atomic import atomic_dir
from losa_deploy.errors import UserError

from .common import base_manifest, check_model_dir

FORMAT_NAME = "compressed-tensors"
MIN_SPARSITY = 0.2  # below this, bitmask + values is larger than the dense fp16/bf16 tensor: keep the layer dense
_SKIP_COPY = (EXPORT_MANIFEST_NAME, MASKS_NAME)


def is_2of4(w: Any) -> bool:
    """True when every group of 4 consecutive inputs (dim 1) holds at most 2 non-zeros (NVIDIA's 2:4)."""
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    return bool(((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all())


def plan_sparsity(model: Any) -> dict[str, Any]:
    """Which linears to compress and with which compressed-tensors format; the fields of `sparsity_config`."""
    import torch
    import torch.nn as nn

    targets, ignore = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight.detach()
        zeros = 1.0 - float(torch.count_nonzero(w)) / max(w.numel(), 1)
        if "lm_head" in name or zeros < MIN_SPARSITY or not w.is_floating_point():
            ignore.append(name)
        else:
            targets.append(name)
    seen, total, nz = set(), 0, 0
    for p in model.parameters():  # tied weights counted once, as llm-compressor's global_sparsity does
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nz += int(torch.count_nonzero(p.detach()))
    mods = dict(model.named_modules())
    two_four = bool(targets) and all(is_2of4(mods[t].weight.detach()) for t in targets)
    return {"format": "sparse-24-bitmask" if two_four else "sparse-bitmask", "targets": targets, "ignore": ignore,
            "sparsity_structure": "2:4" if two_four else "unstructured",
            "global_sparsity": round(1.0 - nz / max(total, 1), 6)}


def _weights_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(d))


def decompressed_tensors(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for every tensor of a compressed-tensors directory, decompressed by the library one at a time
    (names as in the files), so a check never holds a second full copy of the model."""
    from compressed_tensors.compressors import ModelCompressor

    comp = ModelCompressor.from_pretrained(str(path))
    if comp is None or comp.sparsity_compressor is None:
        raise UserError(f"'{path}' has no compressed-tensors sparsity_config in its config.json")
    yield from comp.sparsity_compressor.decompress(str(path))


def export_compressed_tensors(model_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> dict:
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import SparsityCompressionConfig
    from transformers import AutoModelForCausalLM

    from losa_deploy.quiet import quiet

    src = check_model_dir(model_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists; pass --overwrite or choose another --out")
    t0 = time.perf_counter()
    try:
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto").eval()
    except Exception as e:
        raise UserError(f"could not load '{src}': {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    check_masks(src, named_weights(model))  # masks are the contract: the bitmask must be the masks' pattern
    plan = plan_sparsity(model)
    if not plan["targets"]:
        raise UserError(f"'{src}' has no linear layer with at least {MIN_SPARSITY:.0%} zeros: nothing to compress "
                        "(compress it first, or ship it as a plain checkpoint)")
    # every Linear except the listed dense ones (lm_head, layers under MIN_SPARSITY): short, and what llm-compressor
    # writes
    cfg = SparsityCompressionConfig.load_from_registry(plan["format"], targets=["Linear"], ignore=plan["ignore"],
                                                       sparsity_structure=plan["sparsity_structure"],
                                                       global_sparsity=plan["global_sparsity"])
    compressor = ModelCompressor(sparsity_config=cfg)
    source = model.state_dict()  # compress() builds new tensors and leaves the model's own as they are
    t1 = time.perf_counter()
    with quiet():
        packed = compressor.compress(model, show_progress=False)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with quiet():
            model.save_pretrained(tmp, state_dict=packed, safe_serialization=True)
        del packed
        compressor.update_config(str(tmp))
        for f in src.iterdir():  # tokenizer, generation config, losa_manifest.json: as they are
            if f.is_file() and f.suffix != ".safetensors" and f.name not in _SKIP_COPY \
                    and not f.name.endswith(".index.json") and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        t2 = time.perf_counter()
        seen, bad = set(), []
        with quiet():
            for k, v in decompressed_tensors(tmp):
                seen.add(k)
                if k not in source or v.dtype != source[k].dtype or not torch.equal(v, source[k]):
                    bad.append(k)
        tied = set(source) - seen
        untied = [k for k in tied if not _is_tied(model, k)]
        if bad or untied:
            raise UserError(f"compressed-tensors round trip is not exact ({len(bad)} tensors differ, e.g. "
                            f"{(bad or untied)[:3]}); nothing was written. This is a bug, please report it")
        dense_bytes, ct_bytes = _weights_bytes(src), _weights_bytes(tmp)
        man = base_manifest(FORMAT_NAME, src, "weights != 0 (bitmask)")
        man["versions"]["compressed-tensors"] = _ct_version()
        man.update({
            "files": {"config": "config.json", "weights": sorted(f.name for f in tmp.glob("*.safetensors"))},
            "sparsity_config": {k: plan[k] for k in ("format", "sparsity_structure", "global_sparsity", "ignore")},
            "compressed_layers": len(plan["targets"]), "dense_layers": len(plan["ignore"]),
            "min_sparsity_to_compress": MIN_SPARSITY,
            "sizes": {"dense_bytes": dense_bytes, "compressed_bytes": ct_bytes,
                      "ratio": round(ct_bytes / max(dense_bytes, 1), 6)},
            "verification": {"decompressed_exact": True, "tensors_compared": len(seen),
                             "tied_not_stored": sorted(tied)},
            "load": ("AutoModelForCausalLM.from_pretrained(DIR, dtype='auto')" if plan["format"] == "sparse-24-bitmask"
                     else "from exporters.compressed_tensors_export import load_sparse; model = load_sparse(DIR)"),
            "timings": {"load_s": round(t1 - t0, 3), "compress_write_s": round(t2 - t1, 3),
                        "verify_s": round(time.perf_counter() - t2, 3), "total_s": round(time.perf_counter() - t0, 3)},
        })
        write_export_manifest(tmp, man)
        for f in tmp.iterdir():  # safetensors writes 0600 files; a checkpoint is meant to be shared
            if f.is_file():
                f.chmod(0o644)
    return man


def _is_tied(model: Any, key: str) -> bool:
    """A state-dict key that save_pretrained leaves out because it shares storage with another (lm_head.weight)."""
    sd = model.state_dict()
    ptr = sd[key].data_ptr()
    return any(k != key and v.data_ptr() == ptr for k, v in sd.items())


def _ct_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("compressed-tensors")
    except md.PackageNotFoundError:
        return "?"


def load_sparse(path: str | Path, dtype: Any = None) -> Any:
    """The model of a compressed-tensors export, via the library's decompressor (works for both formats).

    Equivalent to: from_config, `ModelCompressor.from_pretrained(DIR).decompress(DIR, model)`, tie_weights()."""
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoConfig, AutoModelForCausalLM

    from losa_deploy.quiet import quiet

    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"'{path}' has no config.json: not a compressed-tensors export")
    with quiet():
        cfg = AutoConfig.from_pretrained(str(p))
        comp = ModelCompressor.from_pretrained(str(p))
        if comp is None:
            raise UserError(f"'{path}' has no compressed-tensors sparsity_config in its config.json")
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(cfg, "dtype", None))
        comp.decompress(str(p), model)
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.eval()
