"""Data-free calibration: text sampled from the model itself, seeded and cached.

Each sequence starts from a random vocabulary token (as in LLM-QAT's data-free generation) and is
sampled with top-p, so the windows cover what the model itself finds likely.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .models import cache_dir


def _cache_key(model: Any, nsamples: int, seqlen: int, seed: int) -> str:
    name = str(getattr(model.config, "_name_or_path", "")) + str(model.config.to_json_string())
    h = hashlib.sha256(f"{name}|{nsamples}|{seqlen}|{seed}".encode()).hexdigest()[:16]
    return f"self-{h}.pt"


@torch.no_grad()
def generate_self_ids(
    model: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0, batch_size: int = 64, top_p: float = 0.95
) -> torch.Tensor:
    """[nsamples, seqlen] token ids sampled from `model`. Cached per model, size and seed.

    Wide batches: a decode step of a small model is bound by reading its weights, so 64 sequences per step cost
    little more than 16; generating the LoSA profiles' training text dominated a fresh run's set-up at 16."""
    from rich.progress import Progress

    from .atomic import write_text  # noqa: F401  (cache write below uses torch.save to a temp then rename)

    path = cache_dir() / "selfdata" / _cache_key(model, nsamples, seqlen, seed)
    if path.is_file():
        try:
            ids = torch.load(path)
            if tuple(ids.shape) == (nsamples, seqlen):
                return ids
        except Exception:
            pass
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    with Progress(transient=True) as progress:
        task = progress.add_task("generating self-calibration text", total=nsamples)
        for b0 in range(0, nsamples, batch_size):
            bs = min(batch_size, nsamples - b0)
            first = torch.randint(0, vocab, (bs, 1), generator=gen)
            for i in range(bs):
                while int(first[i, 0]) in special:
                    first[i, 0] = int(torch.randint(0, vocab, (1,), generator=gen))
            seq = first.to(device)
            past = None
            cur = seq
            for _ in range(seqlen - 1):
                o = model(input_ids=cur, past_key_values=past, use_cache=True)
                past = o.past_key_values
                probs = torch.softmax(o.logits[:, -1, :].float(), dim=-1).cpu()
                sp, si = probs.sort(dim=-1, descending=True)
                keep = sp.cumsum(-1) - sp < top_p
                sp = sp * keep
                nxt = si.gather(-1, torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=gen))
                cur = nxt.to(device)
                seq = torch.cat([seq, cur], dim=1)
            out.append(seq.cpu())
            progress.update(task, advance=bs)
    ids = torch.cat(out, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(ids, tmp)
    tmp.replace(path)
    return ids
