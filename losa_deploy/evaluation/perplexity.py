"""Perplexity exactly as the pruning literature computes it (METHODS §5).

One tokenisation of the whole evaluation string, non-overlapping windows of `seqlen`, the tail dropped,
`ppl = exp(sum of window NLL / (n_windows * seqlen))` where each window's NLL is its mean token loss times seqlen
(the references multiply HF's mean shifted loss by seqlen, so we do the same to agree with their numbers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import UserError


@dataclass
class PerplexityResult:
    perplexity: float
    seqlen: int
    windows: int
    tokens_evaluated: int
    tokens_total: int
    max_tokens: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_eval_text(tokenizer: Any, text: str) -> torch.Tensor:
    from ..quiet import quiet

    with quiet():  # "Token indices sequence length is longer than ...": expected, the text is cut into windows
        return tokenizer(text, return_tensors="pt").input_ids[0]


@torch.no_grad()
def perplexity(
    model: Any,
    ids: torch.Tensor,
    seqlen: int,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """`ids`: the 1-D token ids of the whole evaluation text."""
    if seqlen <= 1:
        raise UserError(f"seqlen must be > 1 (got {seqlen})")
    total = int(ids.numel())
    usable = total if max_tokens is None else min(total, max_tokens)
    n = usable // seqlen
    if n < 1:
        raise UserError(f"the evaluation text has {usable} tokens, fewer than one window of seqlen={seqlen}")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and seqlen > context:  # what transformers' length notices are about, said once
        from ..console import err

        err.print(f"[yellow]warning:[/yellow] seqlen {seqlen} is longer than the model's context ({context} positions);"
                  " this perplexity is not comparable with published figures", highlight=False, soft_wrap=True)
    device = next(model.parameters()).device
    nll_sum = 0.0
    from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

    from ..progress import make_progress

    cols = (
        TextColumn("perplexity"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} windows"),
        TimeRemainingColumn(),
    )
    with make_progress(*cols, disable=not progress, transient=True) as prog:
        task = prog.add_task("perplexity", total=n)
        for b in range(0, n, batch_size):
            nb = min(batch_size, n - b)
            batch = ids[b * seqlen : (b + nb) * seqlen].view(nb, seqlen).to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            shift = logits[:, :-1, :].float()
            labels = batch[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift.reshape(-1, shift.size(-1)), labels.reshape(-1), reduction="none"
            )
            # mean per window, times seqlen: the references' convention
            nll_sum += float(loss.view(nb, -1).mean(dim=1).sum()) * seqlen
            prog.update(task, advance=nb)
    ppl = math.exp(nll_sum / (n * seqlen))
    return PerplexityResult(ppl, seqlen, n, n * seqlen, total, max_tokens)


def evaluate_perplexity(
    model: Any, tokenizer: Any, data: str, seqlen: int, max_tokens: int | None = None, progress: bool = True
) -> PerplexityResult:
    from ..data import eval_text

    ids = tokenize_eval_text(tokenizer, eval_text(data))
    return perplexity(model, ids, seqlen, max_tokens=max_tokens, progress=progress)
