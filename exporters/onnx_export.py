"""`--format onnx`: optimum's exporter (task text-generation-with-past), fp32, weights as initializers.

Verified with ONNX Runtime against PyTorch before the directory appears: prompt logits within LOGIT_ATOL_FP32,
identical greedy tokens, and every pruned weight still exactly zero in its initializer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from losa_deploy.artifact import write_export_manifest
from losa_deploy.atomic import atomic_dir
from losa_deploy.console import err
from losa_deploy.errors import UserError

from .common import base_manifest, check_model_dir, check_zero_patterns, load_masks, load_source
from .verify import LOGIT_ATOL_FP32, compare, prompt_ids, torch_reference

VERIFY_TOKENS = 8


class OptimumSession:
    """Greedy prefill/decode over optimum's decoder graph (inputs: input_ids, attention_mask, [position_ids],
    past_key_values.{i}.key/value; outputs: logits, present.{i}.key/value)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.past: dict[str, np.ndarray] = {}
        self.length = 0

    def _empty_past(self) -> dict[str, np.ndarray]:
        feeds = {}
        for n in self.past_names:
            shp = [d if isinstance(d, int) else 0 for d in self.inputs[n].shape]
            shp[0] = 1
            feeds[n] = np.zeros(shp, dtype=np.float32)
        return feeds

    def _run(self, ids: np.ndarray) -> np.ndarray:
        n = ids.shape[1]
        feeds: dict[str, np.ndarray] = {"input_ids": ids.astype(np.int64)}
        total = self.length + n
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(self.length, total, dtype=np.int64)[None]
        feeds.update(self.past if self.past else self._empty_past())
        outs = dict(zip(self.outputs, self.sess.run(None, feeds)))
        self.past = {n: outs[n.replace("past_key_values", "present")] for n in self.past_names}
        self.length = total
        return outs["logits"]

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.past, self.length = {}, 0
        return self._run(ids)

    def decode(self, tok: int) -> np.ndarray:
        return self._run(np.array([[tok]], dtype=np.int64))[0, -1]


def export_onnx(model_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False, opset: int | None = None,
                verify_tokens: int = VERIFY_TOKENS) -> dict:
    """optimum main_export + verification + export_manifest.json, atomically."""
    src = check_model_dir(model_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists; pass --overwrite or choose another --out")
    try:
        from optimum.exporters.onnx import main_export
    except Exception as e:  # pragma: no cover - optimum is pinned
        raise UserError(f"optimum's ONNX exporter is not available ({type(e).__name__}): pip install optimum-onnx")
    t0 = time.perf_counter()
    model, tok = load_source(src, "float32", None)
    masks, mask_source = load_masks(src, model)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        err.print("[dim]exporting with optimum (text-generation-with-past, fp32)[/dim]")
        t = time.perf_counter()
        kw: dict[str, Any] = {}
        if opset:
            kw["opset"] = opset
        try:
            if getattr(model.config, "_attn_implementation", None) == "eager" and \
                    getattr(model.config, "attn_logit_softcapping", None):
                # main_export would reload it with SDPA, which drops Gemma-2's attention soft-capping: export the
                # eager model already loaded instead (the same exporter underneath)
                from optimum.exporters.onnx import onnx_export_from_model

                onnx_export_from_model(model, output=str(tmp), task="text-generation-with-past", device="cpu",
                                       do_validation=False, preprocessors=[tok], **kw)
            else:
                main_export(str(src), output=str(tmp), task="text-generation-with-past", device="cpu", dtype="fp32",
                            do_validation=False, **kw)
        except UserError:
            raise
        except (ValueError, KeyError, NotImplementedError) as e:
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(
                f"optimum cannot export '{src}' to ONNX ({msg}); this architecture is not supported for --format onnx"
            )
        export_s = time.perf_counter() - t
        onnx_files = sorted(p.name for p in tmp.glob("*.onnx"))
        if "model.onnx" not in onnx_files:
            raise UserError(f"optimum wrote {onnx_files or 'no ONNX file'}, expected model.onnx")
        import onnx

        g = onnx.load(str(tmp / "model.onnx"), load_external_data=True)
        zeros = check_zero_patterns(g, model, masks, base_dir=tmp)
        external = any(e.key == "location" for i in g.graph.initializer for e in i.external_data)
        opset_used = next((o.version for o in g.opset_import if o.domain in ("", "ai.onnx")), None)
        del g

        err.print("[dim]verifying: onnxruntime vs PyTorch[/dim]")
        ids = prompt_ids(tok, 64)
        ref_logits, ref_tokens = torch_reference(model, ids, verify_tokens)
        sess = OptimumSession(tmp / "model.onnx")
        logits = sess.prefill(ids)[0]
        last = logits[-1]
        toks: list[int] = []
        for i in range(verify_tokens):
            toks.append(int(np.argmax(last)))
            if i + 1 < verify_tokens:
                last = sess.decode(toks[-1])
        cmp = compare(ref_logits, ref_tokens, logits, toks, LOGIT_ATOL_FP32)
        if not (cmp["logits_ok"] and cmp["tokens_match"] and zeros["ok"]):
            raise UserError(
                f"ONNX export failed verification (max |dlogit| {cmp['max_abs_logit_diff']:.2e} vs tol "
                f"{LOGIT_ATOL_FP32:g}, tokens match {cmp['tokens_match']}, zeros kept {zeros['ok']}); not written"
            )
        man = base_manifest("onnx", src, mask_source)
        man.update({
            "exporter": "optimum.exporters.onnx.main_export", "task": "text-generation-with-past", "dtype": "float32",
            "files": onnx_files, "external_data": external, "opset": opset_used,
            "verification": {"prompt_tokens": int(ids.shape[1]), "onnxruntime_vs_torch": cmp,
                             "zero_pattern": {k: zeros[k] for k in ("ok", "checked", "missing", "violations")}},
            "layer_sparsity": {k: v["onnx_sparsity"] for k, v in zeros["layers"].items()},
            "timings": {"optimum_export_s": round(export_s, 3), "total_s": round(time.perf_counter() - t0, 3)},
            "note": "DeepSparse 1.8 aborts on this dynamic KV graph; use --format deepsparse for DeepSparse",
        })
        write_export_manifest(tmp, man)
    return man
