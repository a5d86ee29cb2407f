"""`--format deepsparse`: a deployment directory DeepSparse 1.8 compiles with its sparse kernels.

model.onnx (+ model.data) traced from exporters.wrapper.KVCacheLM (eager attention, explicit 4-D mask, rotary
table), config.json and tokenizer beside it, export_manifest.json with the verification. One file serves a
prefill engine (seq = prefill_len) and a decode engine (seq = 1), both with total length max_len.
"""

from __future__ import annotations


import time
from pathlib import Path
from typing import Any

import numpy as np

from losa_deploy.artifact import write_export_manifest
from losa_deploy.atomic import atomic_dir
from losa_deploy.console import err
from losa_deploy.graph_contract import io_names, kv_geometry

from .common import (
    base_manifest,
    check_model_dir,
    check_zero_patterns,
    copy_tokenizer_and_config,
    load_masks,
    load_source,
)
from .verify import LOGIT_ATOL_FP32, compare, prompt_ids, run_deepsparse_probe, torch_reference
from .wrapper import WRAPPER_TYPES, check_wrapper_support, export_wrapper_onnx, rotary_table_limit

SUPPORTED_TYPES = WRAPPER_TYPES
SPARSE_LAYER_THRESHOLD = 0.5  # zeros share from which we list a layer as sparse (our threshold, not DeepSparse's)


def check_supported(config: Any, fmt: str, max_len: int | None = None) -> None:
    """What the KV-cache wrapper graph reproduces (exporters.wrapper.check_wrapper_support)."""
    check_wrapper_support(config, fmt, max_len)


def table_len_for(config: Any, max_len: int) -> int:
    """Rotary table length: the model's context (so later runs may use a longer --max-len), capped where rope
    scaling depends on the sequence length."""
    n = max(int(getattr(config, "max_position_embeddings", max_len)), max_len)
    limit = rotary_table_limit(config)
    return min(n, limit) if limit else n


def export_deepsparse(model_dir: str | Path, out_dir: str | Path, *, prefill_len: int = 128, max_len: int = 512,
                      overwrite: bool = False, threads: int | None = None, verify_tokens: int = 16,
                      opset: int = 17) -> dict:
    """Trace, save, verify (ORT vs PyTorch, DeepSparse greedy tokens vs PyTorch) and write the manifest."""
    from losa_deploy.errors import UserError
    from losa_deploy.runners import default_threads, require_deepsparse

    if not 14 <= opset <= 17:
        raise UserError(f"opset {opset} is outside what DeepSparse 1.8 supports (14-17)")
    if prefill_len < 1 or max_len <= prefill_len:
        raise UserError(f"need 1 <= --prefill-len < --max-len (got {prefill_len}, {max_len})")
    src = check_model_dir(model_dir)
    from losa_deploy.models import load_config

    check_supported(load_config(str(src)), "deepsparse", max_len)  # before the weights are loaded
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists; pass --overwrite or choose another --out")
    require_deepsparse()
    threads = int(threads or default_threads())
    t0 = time.perf_counter()
    err.print(f"[dim]loading {src} (eager attention, fp32)[/dim]")
    model, tok = load_source(src, "float32", "eager")
    masks, mask_source = load_masks(src, model)
    table_len = table_len_for(model.config, max_len)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        err.print(f"[dim]tracing the KV-cache wrapper (opset {opset}, prefill {prefill_len}, max_len {max_len})[/dim]")
        t = time.perf_counter()
        export_wrapper_onnx(model, str(tmp / "model.onnx"), seq=prefill_len, past=max_len - prefill_len,
                            opset=opset, dynamic=True, external_data=True, table_len=table_len)
        export_s = time.perf_counter() - t
        copy_tokenizer_and_config(src, tok, model.config, tmp)

        import onnx

        graph = onnx.load(str(tmp / "model.onnx"), load_external_data=True)
        zeros = check_zero_patterns(graph, model, masks, base_dir=tmp)
        op_counts: dict[str, int] = {}
        for n in graph.graph.node:
            op_counts[n.op_type] = op_counts.get(n.op_type, 0) + 1
        del graph
        if not zeros["ok"]:
            raise UserError(
                f"exported weights lost their zero pattern ({zeros['violations'][:1] or zeros['missing'][:3]}); "
                "this is a bug, please report it"
            )

        ids = prompt_ids(tok, prefill_len)
        checks = _verify(model, tmp, ids, prefill_len=prefill_len, max_len=max_len, threads=threads,
                         verify_tokens=verify_tokens)
        manifest = base_manifest("deepsparse", src, mask_source)
        manifest.update(_manifest_fields(model.config, zeros, op_counts, checks, opset=opset, table_len=table_len,
                                         prefill_len=prefill_len, max_len=max_len, threads=threads))
        manifest["timings"] = {"trace_s": round(export_s, 3), "total_s": round(time.perf_counter() - t0, 3)}
        manifest["run"] = f"losa-deploy generate {out} --runtime deepsparse --prompt 'Hello'"
        write_export_manifest(tmp, manifest)
    return manifest


def _verify(model: Any, tmp: Path, ids: Any, *, prefill_len: int, max_len: int, threads: int,
            verify_tokens: int) -> dict[str, Any]:
    """ONNX Runtime logits and greedy tokens against PyTorch, then DeepSparse's greedy tokens (in a child process);
    a mismatch raises, so nothing is written."""
    from losa_deploy.errors import UserError
    from losa_deploy.runners import OrtRunner

    err.print("[dim]verifying: onnxruntime vs PyTorch[/dim]")
    ref_logits, ref_tokens = torch_reference(model, ids, verify_tokens)
    ort_runner = OrtRunner(tmp / "model.onnx", model.config, prefill_len, max_len, threads)
    t = time.perf_counter()
    o_logits = ort_runner.prefill(ids)[0]
    o_tokens = _greedy_from(ort_runner, o_logits[-1], verify_tokens)
    ort_s = time.perf_counter() - t
    ort_cmp = compare(ref_logits, ref_tokens, o_logits, o_tokens, LOGIT_ATOL_FP32)
    del ort_runner
    if not (ort_cmp["logits_ok"] and ort_cmp["tokens_match"]):
        raise UserError(f"onnxruntime does not match PyTorch (max |dlogit| {ort_cmp['max_abs_logit_diff']:.2e}, "
                        f"tokens match: {ort_cmp['tokens_match']}); export not written")

    err.print(f"[dim]verifying: DeepSparse compile + {verify_tokens} greedy tokens "
              f"(child process, {threads} cores)[/dim]")
    probe, ds_logits = run_deepsparse_probe(tmp / "model.onnx", tmp, ids, prefill_len=prefill_len,
                                            max_len=max_len, threads=threads, new_tokens=verify_tokens)
    ds_cmp = compare(ref_logits, ref_tokens, ds_logits, probe["tokens"], LOGIT_ATOL_FP32)
    if not ds_cmp["tokens_match"]:
        raise UserError(
            f"DeepSparse greedy tokens differ from PyTorch at new token {ds_cmp['first_token_mismatch']} "
            f"(max |dlogit| {ds_cmp['max_abs_logit_diff']:.2e}); export not written"
        )
    return {"ort": ort_cmp, "ort_s": ort_s, "deepsparse": ds_cmp, "probe": probe, "prompt_tokens": int(ids.shape[1])}


def _manifest_fields(config: Any, zeros: dict[str, Any], op_counts: dict[str, int], checks: dict[str, Any], *,
                     opset: int, table_len: int, prefill_len: int, max_len: int, threads: int) -> dict[str, Any]:
    """The export-specific part of the manifest: graph interface, engines, DeepSparse's compile, verification."""
    n_layers, kv_heads, head_dim = kv_geometry(config)
    inputs, outputs = io_names(n_layers)
    probe = checks["probe"]
    sparse_layers = {k: v["onnx_sparsity"] for k, v in zeros["layers"].items()}
    return {
        "files": {"model": "model.onnx", "weights": "model.data"},
        "opset": opset,
        "dtype": "float32",
        "attention": "eager (explicit 4-D additive mask)",
        "rotary_table_len": table_len,
        "io": {
            "inputs": inputs,
            "outputs": outputs,
            "kv_layout": "batch, kv_heads, length, head_dim",
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "layers": n_layers,
        },
        "engines": {
            "prefill": {"seq": prefill_len, "past": max_len - prefill_len},
            "decode": {"seq": 1, "past": max_len - 1},
            "max_len": max_len,
            "cache": "fixed length max_len, right-aligned; oldest slot drops each call",
        },
        "onnx_ops": dict(sorted(op_counts.items(), key=lambda kv: -kv[1])),
        "deepsparse": {
            "compiled": True,
            "threads": threads,
            "compile_s_both_engines": round(probe["compile_s"], 3),
            "fraction_of_supported_ops": {
                k: v.get("fraction_of_supported_ops") for k, v in probe["engines"].items()
            },
            "engine_repr": {k: v["repr"] for k, v in probe["engines"].items()},
            "sparse_layers_threshold": SPARSE_LAYER_THRESHOLD,
            "sparse_layers": sorted(k for k, v in sparse_layers.items() if v >= SPARSE_LAYER_THRESHOLD),
            "dense_layers": sorted(k for k, v in sparse_layers.items() if v < SPARSE_LAYER_THRESHOLD),
            "note": "sparse_layers lists MatMul weights whose initializers are >= threshold zeros; DeepSparse "
            "picks its sparse kernels itself and does not report per-layer choices",
        },
        "verification": {
            "prompt_tokens": checks["prompt_tokens"],
            "onnxruntime_vs_torch": {**checks["ort"], "seconds": round(checks["ort_s"], 3)},
            "deepsparse_vs_torch": {
                **checks["deepsparse"],
                "prefill_s": round(probe["prefill_s"], 4),
                "decode_s": round(probe["decode_s"], 4),
            },
            "zero_pattern": {k: zeros[k] for k in ("ok", "checked", "missing", "violations")},
        },
        "layer_sparsity": sparse_layers,
    }


def _greedy_from(runner: Any, last: np.ndarray, n: int) -> list[int]:
    toks: list[int] = []
    for i in range(n):
        t = int(np.argmax(last))
        toks.append(t)
        if i + 1 < n:
            last = runner.decode(t)
    return toks


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


__all__ = ["export_deepsparse", "check_supported", "dir_size", "table_len_for"]

