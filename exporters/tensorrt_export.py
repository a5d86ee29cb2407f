"""`--format tensorrt`: an fp16 ONNX (the KV-cache wrapper graph traced in fp16) plus a 2:4 report and the exact
trtexec line that builds a sparse engine. TensorRT itself is not needed (or used) here.

2:4 is checked along the input (K) dimension of each MatMul/Gemm weight, i.e. dim 1 of the PyTorch [N, K] weight:
every group of 4 consecutive inputs keeps at most 2 non-zeros (NVIDIA's convention). No `sparsity_config` is
written to config.json (current vLLM rejects it).
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
from losa_deploy.errors import UserError

from .common import (
    base_manifest,
    check_model_dir,
    check_zero_patterns,
    copy_tokenizer_and_config,
    linear_weights,
    load_masks,
    load_source,
)
from .verify import LOGIT_ATOL_FP16, compare, prompt_ids, torch_reference
from .wrapper import export_wrapper_onnx, graph_parity_fp32

ALIGN = 16  # fp16 sparse tensor-core kernels need K and N multiples of 16 (conservative; cuSPARSELt's fp16 rule)
DENSE_BELOW = 0.25  # a weight with fewer zeros than this is reported "dense", not "wrong pattern"


def check_2of4(weight: np.ndarray) -> tuple[str, str]:
    """Classify one [N, K] weight: ("eligible", "") or ("ineligible", why). Pure; K is dim 1 (the inputs)."""
    if weight.ndim != 2:
        return "ineligible", f"not a 2-D weight (shape {list(weight.shape)})"
    n, k = weight.shape
    if k % 4:
        return "ineligible", f"K={k} is not a multiple of 4 (no complete 2:4 groups)"
    if k % ALIGN or n % ALIGN:
        return "ineligible", f"shape [N={n}, K={k}] is not a multiple of {ALIGN} (fp16 sparse kernels)"
    nz = (weight.reshape(n, k // 4, 4) != 0).sum(-1)
    bad = int((nz > 2).sum())
    if bad == 0:
        return "eligible", ""
    zeros = 1.0 - np.count_nonzero(weight) / weight.size
    if zeros < DENSE_BELOW:
        return "ineligible", f"dense ({zeros:.0%} zeros)"
    return "ineligible", f"wrong pattern: {bad} of {nz.size} groups of 4 inputs keep more than 2 ({zeros:.0%} zeros)"


def two_four_report(weights: dict[str, np.ndarray], skipped: dict[str, str] | None = None) -> dict:
    """Per-layer 2:4 status for named [N, K] weights, plus skipped ones (name -> why) and a summary."""
    layers: dict[str, dict] = {}
    for name, w in weights.items():
        status, why = check_2of4(w)
        layers[name] = {"status": status, "reason": why, "shape": list(w.shape)}
    for name, why in (skipped or {}).items():
        layers[name] = {"status": "skipped", "reason": why}
    summary = {s: sum(1 for v in layers.values() if v["status"] == s) for s in ("eligible", "ineligible", "skipped")}
    first_bad = next((k for k, v in layers.items() if v["status"] == "ineligible"), None)
    return {"layers": layers, "summary": summary, "first_ineligible": first_bad}


def magnitude_2of4_(weight: Any) -> Any:
    """In place: keep the 2 largest-|w| of every 4 consecutive inputs; returns the keep mask (True = keep)."""
    import torch

    n, k = weight.shape
    g = weight.data.reshape(n, k // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    g.mul_(keep)
    return keep.reshape(n, k)


def trtexec_command(onnx_path: Path, engine_path: Path, config: Any, prefill_len: int, max_len: int) -> str:
    """The trtexec line for a sparse fp16 engine with one optimisation profile (decode .. prefill shapes)."""
    layers, kv, hd = kv_geometry(config)

    def shapes(seq: int) -> str:
        past = max_len - seq
        parts = [
            f"input_ids:1x{seq}",
            f"attention_mask:1x{max_len}",
            f"positions:1x{seq}",
            f"causal_mask:1x1x{seq}x{max_len}",
        ]
        for i in range(layers):
            parts += [f"past_key_values.{i}.key:1x{kv}x{past}x{hd}", f"past_key_values.{i}.value:1x{kv}x{past}x{hd}"]
        return ",".join(parts)

    return (f"trtexec --onnx={onnx_path} --fp16 --sparsity=enable --saveEngine={engine_path} "
            f"--minShapes={shapes(1)} --optShapes={shapes(1)} --maxShapes={shapes(prefill_len)}")


def export_tensorrt(model_dir: str | Path, out_dir: str | Path, *, force_2of4: bool = False, overwrite: bool = False,
                    prefill_len: int = 128, max_len: int = 512, opset: int = 17) -> dict:
    from .deepsparse_export import check_supported, table_len_for

    src = check_model_dir(model_dir)
    from losa_deploy.models import load_config

    check_supported(load_config(str(src)), "tensorrt", max_len)  # before the weights are loaded
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists; pass --overwrite or choose another --out")
    t0 = time.perf_counter()
    model, tok = load_source(src, "float32", "eager")
    masks, mask_source = load_masks(src, model)
    lin = linear_weights(model)
    report = two_four_report({k: v.detach().numpy() for k, v in lin.items()})
    forced = None
    if report["first_ineligible"] is not None:
        first = report["first_ineligible"]
        why = report["layers"][first]["reason"]
        shape_problem = "multiple of" in why
        if not force_2of4 or shape_problem:
            hint = "" if shape_problem else "; pass --force-2of4 to re-prune it to 2:4 by magnitude"
            raise UserError(f"not a 2:4 checkpoint: first offending layer {first} ({why}){hint}")
        err.print("[yellow]--force-2of4: re-pruning every block linear to 2:4 by magnitude[/yellow]")
        for name, w in lin.items():
            if report["layers"][name]["status"] != "eligible":
                masks[name] = magnitude_2of4_(w).numpy() & masks[name]
        forced = {"layers": sum(1 for v in report["layers"].values() if v["status"] != "eligible"),
                  "method": "magnitude, 2 of every 4 inputs"}
        report = two_four_report({k: v.detach().numpy() for k, v in lin.items()})
    ref_model_fp32 = model
    ids = prompt_ids(tok, prefill_len)
    ref_logits, ref_tokens = torch_reference(ref_model_fp32, ids, 4)
    # fp16 logits can only be compared loosely, so the graph's own computation is checked exactly in fp32 first
    graph_fp32 = graph_parity_fp32(model, ids, ref_logits, ref_tokens, prefill_len=prefill_len, max_len=max_len,
                                   table_len=table_len_for(model.config, max_len))
    if not (graph_fp32["logits_ok"] and graph_fp32["tokens_match"]):
        raise UserError(f"the KV-cache graph does not reproduce {type(model).__name__} in fp32 (max |dlogit| "
                        f"{graph_fp32['max_abs_logit_diff']:.2e}, tokens match: {graph_fp32['tokens_match']}); "
                        "export not written")
    model_fp16 = model.half()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        err.print("[dim]tracing the KV-cache wrapper in fp16[/dim]")
        t = time.perf_counter()
        export_wrapper_onnx(model_fp16, str(tmp / "model.onnx"), seq=prefill_len, past=max_len - prefill_len,
                            opset=opset, dynamic=True, external_data=True,
                            table_len=table_len_for(model.config, max_len))
        trace_s = time.perf_counter() - t
        copy_tokenizer_and_config(src, tok, model.config, tmp)
        import onnx

        g = onnx.load(str(tmp / "model.onnx"), load_external_data=True)
        zeros = check_zero_patterns(g, model_fp16, masks, base_dir=tmp, dtype=np.float16)
        # ONNX-side report: every 2-D float initializer feeding MatMul/Gemm, mapped back to parameters where possible
        mm_inits = _matmul_initializers(g)
        mapped = {v["initializer"]: k for k, v in zeros["layers"].items()}
        skipped = {f"{n} (initializer)": "not a block linear (lm_head / embedding copy), not pruned"
                   for n in mm_inits if n not in mapped}
        del g
        report = two_four_report({k: v.detach().float().numpy() for k, v in lin.items()}, skipped)
        if not zeros["ok"]:
            raise UserError(
                f"fp16 export lost zero patterns ({zeros['violations'][:1] or zeros['missing'][:3]}); please report it"
            )
        verification: dict[str, Any] = {
            "zero_pattern": {k: zeros[k] for k in ("ok", "checked", "missing", "violations")},
            "graph_fp32_vs_torch": graph_fp32}
        try:
            from losa_deploy.runners import OrtRunner

            r = OrtRunner(tmp / "model.onnx", model.config, prefill_len, max_len, 1)
            r.dtype = np.float16
            r.reset()
            logits = r.prefill(ids)[0].astype(np.float32)
            last, toks = logits[-1], []
            for i in range(4):
                toks.append(int(np.argmax(last)))
                if i < 3:
                    last = r.decode(toks[-1]).astype(np.float32)
            verification["onnxruntime_fp16_vs_torch_fp32"] = compare(
                ref_logits, ref_tokens, logits, toks, LOGIT_ATOL_FP16
            )
        except UserError:
            raise
        except Exception as e:  # ORT's CPU provider lacks some fp16 kernels; TensorRT is the real target
            verification["onnxruntime_fp16_vs_torch_fp32"] = {"skipped": f"{type(e).__name__}: {str(e)[:200]}"}
        cmd = trtexec_command(out / "model.onnx", out / "model.plan", model.config, prefill_len, max_len)
        inputs, outputs = io_names(model.config.num_hidden_layers)
        man = base_manifest("tensorrt", src, mask_source)
        man.update({
            "dtype": "float16", "opset": opset, "files": {"model": "model.onnx", "weights": "model.data"},
            "io": {"inputs": inputs, "outputs": outputs}, "engines": {"prefill_len": prefill_len, "max_len": max_len},
            "two_four": report, "forced_2of4": forced, "trtexec": cmd, "verification": verification,
            "timings": {"trace_s": round(trace_s, 3), "total_s": round(time.perf_counter() - t0, 3)},
        })
        write_export_manifest(tmp, man)
        (tmp / "build_engine.sh").write_text("#!/bin/sh\nset -e\n" + cmd + "\n")
    return man


def _matmul_initializers(g: Any) -> list[str]:
    inits = {i.name for i in g.graph.initializer if len(i.dims) == 2}
    names = []
    for n in g.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            names += [x for x in n.input if x in inits]
    return sorted(set(names))
