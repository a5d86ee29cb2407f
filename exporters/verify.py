"""Verification shared by the exporters: PyTorch reference logits and greedy tokens, compared with a runtime's.

Tolerances are stated, not implied: fp32 exports must match within LOGIT_ATOL_FP32 (max |delta logit| on a fixed
prompt) and produce identical greedy tokens; fp16 exports are reported against a looser LOGIT_ATOL_FP16.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from losa_deploy.errors import UserError

LOGIT_ATOL_FP32 = 1e-3
LOGIT_ATOL_FP16 = 5e-2
PROMPT = "The capital of France is Paris. Sparse language models run faster when"


def prompt_ids(tokenizer: Any, max_tokens: int) -> np.ndarray:
    ids = tokenizer(PROMPT, return_tensors="np")["input_ids"].astype(np.int64)
    return ids[:, :max_tokens]


def torch_reference(model: Any, ids: np.ndarray, new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """(prompt logits [P, V] fp32, greedy new tokens) from the PyTorch model with its own KV cache."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids), use_cache=True)
        logits = out.logits[0].float().numpy()
        past = out.past_key_values
        toks: list[int] = []
        last = out.logits[0, -1]
        for i in range(new_tokens):
            tok = int(torch.argmax(last))
            toks.append(tok)
            if i + 1 < new_tokens:
                o = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past, last = o.past_key_values, o.logits[0, -1]
    return logits, toks


def greedy(prefill: Callable[[np.ndarray], np.ndarray], decode: Callable[[int], np.ndarray], ids: np.ndarray,
           new_tokens: int) -> tuple[np.ndarray, list[int]]:
    logits = prefill(ids)[0]
    last = logits[-1]
    toks: list[int] = []
    for i in range(new_tokens):
        tok = int(np.argmax(last))
        toks.append(tok)
        if i + 1 < new_tokens:
            last = decode(tok)
    return logits, toks


def compare(ref_logits: np.ndarray, ref_tokens: list[int], logits: np.ndarray, tokens: list[int], atol: float) -> dict:
    d = float(np.abs(ref_logits.astype(np.float64) - logits.astype(np.float64)).max())
    first_diff = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), None)
    return {"max_abs_logit_diff": d, "logit_tolerance": atol, "logits_ok": bool(d <= atol),
            "new_tokens": len(ref_tokens), "tokens_match": tokens == ref_tokens, "first_token_mismatch": first_diff,
            "reference_tokens": ref_tokens, "tokens": tokens}


def run_deepsparse_probe(onnx_path: Path, config_dir: Path, ids: np.ndarray, *, prefill_len: int, max_len: int,
                         threads: int, new_tokens: int, timeout: float = 3600) -> tuple[dict, np.ndarray]:
    """Compile and run both DeepSparse engines in a child process; an abort there becomes a UserError here."""
    with tempfile.TemporaryDirectory(prefix="losa-dsprobe-") as td:
        spec = {"onnx": str(onnx_path), "config_dir": str(config_dir), "prefill_len": prefill_len, "max_len": max_len,
                "threads": threads, "prompt_ids": ids[0].tolist(), "new_tokens": new_tokens,
                "logits_npy": str(Path(td) / "logits.npy")}
        (Path(td) / "spec.json").write_text(json.dumps(spec))
        root = Path(__file__).resolve().parents[1]
        try:
            r = subprocess.run([sys.executable, "-m", "exporters._ds_probe", str(Path(td) / "spec.json")],
                               capture_output=True, text=True, timeout=timeout, cwd=str(root))
        except subprocess.TimeoutExpired:
            raise UserError(f"DeepSparse did not compile the model within {timeout:.0f} s")
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("LOSA_PROBE ")), None)
        if r.returncode != 0 or line is None:
            text = (r.stdout + "\n" + r.stderr)
            why = "an assertion in its graph compiler" if "Assertion at" in text else \
                (text.strip().splitlines() or ["no output"])[-1][:200]
            raise UserError(
                f"DeepSparse could not compile/run the exported graph (child exited {r.returncode}: {why}); "
                "the ONNX export itself is fine for onnxruntime: try --format onnx"
            )
        return json.loads(line[len("LOSA_PROBE "):]), np.load(spec["logits_npy"])
