"""What `losa-deploy evaluate` does besides parsing and printing: check the request before the model load, load the
model (a checkpoint must agree with its masks), then perplexity and/or zero-shot accuracy as JSON-ready entries.

Why the checks come first: a typo in a task file or a bad window length fails in a second, not after the load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError


@dataclass
class EvalRequest:
    """The evaluation asked for, checked: perplexity on `data` (default wikitext2) and/or zero-shot `tasks`."""

    data: str | None = None
    seqlen: int = 2048
    max_tokens: int | None = None
    tasks: dict[str, str | None] = field(default_factory=dict)  # name -> local file, or None (fetched by the harness)
    limit: int | None = None
    batch_size: int = 8

    @property
    def perplexity(self) -> bool:
        """Perplexity runs when text is given, or when no zero-shot task is asked for."""
        return self.data is not None or not self.tasks


def check_request(data: str | None, seqlen: int, max_tokens: int | None, tasks: str | None,
                  task_data: list[str] | None, limit: int | None, batch_size: int) -> EvalRequest:
    """The request from the command's options (errors name the flags), every local task file read once."""
    from ..cpu_gemm import resolve_cpu_gemm

    resolve_cpu_gemm()  # a bad LOSA_DEPLOY_CPU_GEMM fails before the model load
    zs_tasks: dict[str, str | None] = {}
    if tasks or task_data:
        from .zeroshot import parse_task_args

        zs_tasks = parse_task_args(tasks, task_data)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1 (got {limit})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {batch_size})")
    req = EvalRequest(data, seqlen, max_tokens, zs_tasks, limit, batch_size)
    if req.perplexity:
        if seqlen <= 1:
            raise UserError(f"--seqlen must be > 1 (got {seqlen})")
        if max_tokens is not None and max_tokens < seqlen:
            raise UserError(f"--max-tokens ({max_tokens}) must be at least one window (--seqlen {seqlen})")
    if zs_tasks:
        from ..tasks.loaders import LOCAL_TASKS

        for name, path in zs_tasks.items():
            if path is not None:
                LOCAL_TASKS[name][0](path, 1)
    return req


def load_checked_model(spec: str, dtype: str, device: str) -> tuple[Any, Any]:
    """The model and tokenizer; a local checkpoint's weights must agree with its sparsity_masks.safetensors."""
    from ..models import load_model

    model, tok = load_model(spec, dtype=dtype, device=device, tokenizer_check="error")
    check_masks_of(spec, model)
    return model, tok


def check_masks_of(spec: str, model: object) -> None:
    """A local checkpoint's weights must agree with its sparsity_masks.safetensors (aliases and GGUF files are dense
    sources with no masks to check). Without masks only a compress output, which should have them, gets a note:
    evaluate is as often given a dense model."""
    from ..artifact import check_masks, has_manifest, named_weights

    p = Path(spec).expanduser()
    if p.is_dir():
        check_masks(p, named_weights(model), note=has_manifest(p))


def perplexity_entry(model: Any, tok: Any, req: EvalRequest) -> dict[str, Any]:
    """{"data", the PerplexityResult fields, "cpu_gemm"} for the request's text (default wikitext2)."""
    from ..cpu_gemm import cpu_gemm
    from .perplexity import evaluate_perplexity

    data = req.data or "wikitext2"
    with cpu_gemm() as gemm:
        res = evaluate_perplexity(model, tok, data, req.seqlen, max_tokens=req.max_tokens)
    return {"data": data, **res.to_dict(), "cpu_gemm": gemm}


def zeroshot_entry(model: Any, tok: Any, req: EvalRequest) -> dict[str, Any]:
    """evaluate_zeroshot's result for the request's tasks, plus the wall time in "seconds"."""
    from ..cpu_gemm import cpu_gemm
    from .zeroshot import evaluate_zeroshot

    t0 = time.perf_counter()
    with cpu_gemm():
        zs = evaluate_zeroshot(model, tok, req.tasks, limit=req.limit, batch_size=req.batch_size)
    zs["seconds"] = round(time.perf_counter() - t0, 1)
    return zs
