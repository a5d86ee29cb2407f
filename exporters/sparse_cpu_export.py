"""`--format sparse-cpu`: packed weights for the sparse CPU runtime (losa_deploy/sparse_cpu), verified first.

Writes model.sparse.safetensors (per block linear: a bitmask per 16 inputs, row offsets and the kept fp32 values,
packed from the explicit sparsity_masks.safetensors; norms, embeddings and biases dense; tied embeddings stored
once), config.json, the tokenizer and export_manifest.json. Before anything appears at the destination:
- the packed zero pattern, unpacked, equals the masks and the packed values equal the checkpoint's kept weights;
- the runtime's prompt logits are within LOGIT_ATOL (max |delta|) of PyTorch fp32 and its greedy tokens identical.
A checkpoint without a masks file is packed dense (noted in the manifest): its zeros are never read as a mask.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from losa_deploy.artifact import MASKS_NAME, write_export_manifest
from losa_deploy.atomic import atomic_dir
from losa_deploy.console import err
from losa_deploy.errors import UserError

from .common import base_manifest, check_model_dir, copy_tokenizer_and_config, load_source
from .verify import LOGIT_ATOL_FP32, compare, greedy, prompt_ids, torch_reference

LOGIT_ATOL = LOGIT_ATOL_FP32  # 1e-3, as the other fp32 exports: PyTorch fp32 itself moves ~2e-4 between thread counts
VERIFY_TOKENS = 8


def read_masks(model_dir: Path, model: Any) -> tuple[dict[str, np.ndarray] | None, str]:
    """Explicit keep-masks for the block linears, or (None, note) without a masks file. Never inferred from zeros;
    weights that left their masks are refused (artifact.check_masks)."""
    from exporters.common import linear_weights
    from losa_deploy.artifact import check_masks, has_masks, load_masks, named_weights

    if not has_masks(model_dir):
        return None, f"none ({MASKS_NAME} absent): every linear packed dense"
    check_masks(model_dir, named_weights(model), note=False)
    weights = linear_weights(model)
    return {k: v.numpy().astype(bool) for k, v in load_masks(model_dir).items() if k in weights}, MASKS_NAME


def check_packed(packed: Any, model: Any, masks: dict[str, np.ndarray] | None) -> dict:
    """Unpack every linear: its keep pattern must equal the mask and its values the checkpoint's kept weights."""
    from losa_deploy.sparse_cpu.runtime import unpack_dense, unpack_keep

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    violations = []
    for name, lay in packed.layout.items():
        arrs = packed.linear(name)
        w = state[f"{name}.weight"]
        keep = None if masks is None else masks.get(f"{name}.weight")
        if lay["kind"] != "dense":
            got = unpack_keep(arrs["masks"], lay["cols"])
            if keep is None or not np.array_equal(got, keep):
                bad = int((got != keep).sum()) if keep is not None else -1
                violations.append({"linear": name, "pattern_mismatches": bad})
                continue
        dense = unpack_dense(arrs, lay["rows"], lay["cols"])
        expect = w if keep is None else np.where(keep, w, np.float32(0))
        if not np.array_equal(dense, expect):
            violations.append({"linear": name, "value_mismatches": int((dense != expect).sum())})
    return {"ok": not violations, "checked": len(packed.layout), "violations": violations[:10]}


def dense_fp32_bytes(model: Any) -> int:
    """Bytes of the model as a dense fp32 checkpoint (a tied embedding counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * 4
    return total


def export_sparse_cpu(model_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                      threads: int | None = None, prefill_len: int = 128, max_len: int = 512,
                      verify_tokens: int = VERIFY_TOKENS, min_sparsity: float = 0.2, atol: float = LOGIT_ATOL) -> dict:
    """Pack, verify against PyTorch, then write the export directory atomically (nothing on failure)."""
    from losa_deploy.runners import default_threads
    from losa_deploy.sparse_cpu.runtime import (
        FORMAT,
        WEIGHTS_FILE,
        SparseCpuRunner,
        check_supported,
        packed_from_model,
        save_packed,
    )

    if prefill_len < 1 or max_len <= prefill_len:
        raise UserError(f"need 1 <= --prefill-len < --max-len (got {prefill_len}, {max_len})")
    src = check_model_dir(model_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists; pass --overwrite or choose another --out")
    threads = int(threads or default_threads())
    t0 = time.perf_counter()
    err.print(f"[dim]loading {src} (fp32, eager attention)[/dim]")
    model, tok = load_source(src, "float32", "eager")
    check_supported(model.config, max_len)
    masks, mask_source = read_masks(src, model)
    with err.status("packing weights from the explicit masks"):
        packed = packed_from_model(model, masks, min_sparsity=min_sparsity)
        zeros = check_packed(packed, model, masks)
    if not zeros["ok"]:
        raise UserError(f"packed weights do not reproduce the masks ({zeros['violations'][0]}); export not written")

    ids = prompt_ids(tok, max_len - verify_tokens)
    err.print(f"[dim]verifying: sparse-cpu vs PyTorch ({ids.shape[1]} prompt tokens + {verify_tokens} greedy, "
              f"{threads} threads)[/dim]")
    ref_logits, ref_tokens = torch_reference(model, ids, verify_tokens)
    runner = SparseCpuRunner(packed, prefill_len=prefill_len, max_len=max_len, threads=threads)
    t = time.perf_counter()
    logits, toks = greedy(runner.prefill, runner.decode, ids, verify_tokens)
    run_s = time.perf_counter() - t
    cmp = compare(ref_logits, ref_tokens, logits, toks, atol)
    desc = runner.describe()
    runner.close()
    if not (cmp["logits_ok"] and cmp["tokens_match"]):
        raise UserError(f"sparse-cpu does not match PyTorch (max |dlogit| {cmp['max_abs_logit_diff']:.2e} vs tol "
                        f"{atol:g}, greedy tokens match: {cmp['tokens_match']}); export not written")

    dense_bytes = dense_fp32_bytes(model)
    lin_packed = {n: sum(a.nbytes for a in packed.linear(n).values()) for n in packed.layout}
    lin_dense = {n: lay["rows"] * lay["cols"] * 4 for n, lay in packed.layout.items()}
    weight_bytes = packed.weight_bytes()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_packed(packed, tmp / WEIGHTS_FILE)
        copy_tokenizer_and_config(src, tok, model.config, tmp)
        file_bytes = (tmp / WEIGHTS_FILE).stat().st_size
        man = base_manifest(FORMAT, src, mask_source)
        man.update({
            "files": {"weights": WEIGHTS_FILE},
            "dtype": "float32",
            "layout": "per linear: uint16 bitmask per 16 inputs [rows, ceil(cols/16)], int64 row_ptr [rows+1], "
                      "kept fp32 values in row-major order; 'dense' linears as [rows, cols]",
            "engines": {"prefill": {"seq": prefill_len}, "max_len": max_len},
            "runtime": {"isa": desc["isa"], "threads": threads, "lm_head": desc["lm_head"],
                        "fused": desc["fused"], "kinds": desc["linears"]},
            "linears": {n: {"kind": lay["kind"],
                            "pattern": "dense" if lay["kind"] == "dense" else
                            (f"{lay['n']}:{lay['m']}" if lay["kind"] == "nm" else "unstructured"),
                            "sparsity": lay["sparsity"], "bytes": lin_packed[n], "dense_fp32_bytes": lin_dense[n]}
                        for n, lay in packed.layout.items()},
            "sizes": {"weight_bytes": weight_bytes, "file_bytes": file_bytes, "dense_fp32_bytes": dense_bytes,
                      "ratio": round(weight_bytes / dense_bytes, 4),
                      "block_linears_bytes": sum(lin_packed.values()),
                      "block_linears_dense_fp32_bytes": sum(lin_dense.values()),
                      "block_linears_ratio": round(sum(lin_packed.values()) / sum(lin_dense.values()), 4),
                      "note": "embeddings (tied lm_head stored once) and norms stay dense fp32"},
            "notes": packed.notes,
            "verification": {"prompt_tokens": int(ids.shape[1]),
                             "sparse_cpu_vs_torch": {**cmp, "seconds": round(run_s, 3)},
                             "zero_pattern": zeros},
            "timings": {"total_s": round(time.perf_counter() - t0, 3)},
            "run": f"losa-deploy generate {out} --runtime sparse-cpu --prompt 'Hello'",
        })
        write_export_manifest(tmp, man)
    return man


__all__ = ["export_sparse_cpu", "read_masks", "check_packed", "dense_fp32_bytes", "LOGIT_ATOL"]
