"""Data-free calibration: text sampled from the model itself, seeded and cached.

Each sequence starts from a random vocabulary token (as in LLM-QAT's data-free generation) and is sampled with
top-p 0.95 (within the top 1024 tokens), so the windows cover what the model itself finds likely.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .models import cache_dir


# Bumped whenever the sampler draws differently for the same seed, so a cache never mixes two samplers' text.
SAMPLER_VERSION = 5


def _cache_key(model: Any, nsamples: int, seqlen: int, seed: int) -> str:
    name = str(getattr(model.config, "_name_or_path", "")) + str(model.config.to_json_string())
    h = hashlib.sha256(f"{name}|{nsamples}|{seqlen}|{seed}|sampler{SAMPLER_VERSION}".encode()).hexdigest()[:16]
    return f"self-{h}.pt"


def top_k_top_p_sample(logits: torch.Tensor, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One draw per row of `logits` [rows, vocab] -> [rows, 1] token ids: the `top_k` most likely tokens, renormalised,
    then their nucleus (the tokens whose preceding mass is below `top_p`), as transformers' top-k then top-p warpers.

    Why a top-k bound: with top-p alone a flat row (the first tokens after a random start) needs a full sort of the
    vocabulary and a draw over all of it; those rows made sampling over half of a 128-row decode step on 2 cores.
    With k = 1024 the nucleus is top-p's own wherever the top 1024 tokens hold `top_p` of the mass (nearly every
    row after the first few tokens); a small k (64) narrows ordinary rows too, and LoSA trained on its text came out
    worse (120.0 against 105.4-113.5, one run; docs/measured/losa-budget.md). The renormalised top-k probabilities
    are the softmax of the top-k logits, so the vocabulary is never normalised."""
    k = min(int(top_k), logits.shape[-1])
    top, idx = logits.float().topk(k, dim=-1)  # sorted descending
    sp = torch.softmax(top, dim=-1)
    sp = sp * (sp.cumsum(-1) - sp < top_p)
    return idx.gather(-1, torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=gen))


def _growing_cache() -> Any:
    """A KV cache whose layers write into buffers grown by doubling, instead of transformers' default `torch.cat` of
    the whole cache at every step (quadratic in the length: over half of a 128-row step at 190 tokens). None where
    this transformers lacks the cache-layer API; generation then uses the default cache."""
    try:
        from transformers.cache_utils import Cache, DynamicLayer
    except ImportError:
        return None

    class GrowingLayer(DynamicLayer):
        def lazy_initialization(self, key_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states)
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None
            self._n = 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
                   cache_kwargs: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states)
            n, end = self._n, self._n + key_states.shape[-2]
            if self._k is None or self._v is None or end > self._k.shape[-2]:
                shape = list(key_states.shape)
                shape[-2] = max(end, 64, 2 * (0 if self._k is None else self._k.shape[-2]))
                k, v = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    k[..., :n, :], v[..., :n, :] = self.keys, self.values
                self._k, self._v = k, v
            self._k[..., n:end, :], self._v[..., n:end, :] = key_states, value_states
            self._n = end
            self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
            return self.keys, self.values

    try:
        return Cache(layer_class_to_replicate=GrowingLayer)
    except TypeError:
        return None


def _generation_copy(model: Any, use_bf16: bool) -> Any:
    """The model to sample from: a bf16 copy where the CPU computes bf16 natively (the fp32 weights under autocast
    are cast again at every decode step), else the model itself. Its logits equal autocast's up to rounding."""
    if not use_bf16 or next(model.parameters()).dtype != torch.float32:
        return model
    import copy

    return copy.deepcopy(model).to(torch.bfloat16).eval()


@torch.no_grad()
def generate_self_ids(
    model: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0, batch_size: int = 128, top_p: float = 0.95,
    top_k: int = 1024,
) -> torch.Tensor:
    """[nsamples, seqlen] token ids sampled from `model`. Cached per model, size and seed.

    Wide batches: a decode step of a small model is bound by reading its weights, so 128 sequences per step cost
    little more than 16; generating the LoSA profiles' training text dominated a fresh run's set-up at 16.
    bf16 autocast where the CPU computes bf16 natively: 1.4x the tokens per second of fp32 at 64 rows
    (2026-12-02, Sapphire-Rapids-class VM, 340 -> 478 tok/s; 128 rows bf16: 516). A bf16 copy of the model and
    a bound of the nucleus to the top 1024 tokens (sampler 5) raised that further (see docs/measured/losa-budget.md)."""
    from .precision import autocast_ctx, bf16_autocast_supported
    from .progress import make_progress

    from .atomic import write_with

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
    use_bf16 = bf16_autocast_supported(str(device))
    sampler = _generation_copy(model, use_bf16)
    with make_progress(transient=True) as progress, autocast_ctx(str(device), use_bf16):
        task = progress.add_task("generating self-calibration text", total=nsamples)
        for b0 in range(0, nsamples, batch_size):
            bs = min(batch_size, nsamples - b0)
            first = torch.randint(0, vocab, (bs, 1), generator=gen)
            for i in range(bs):
                while int(first[i, 0]) in special:
                    first[i, 0] = int(torch.randint(0, vocab, (1,), generator=gen))
            seq = first.to(device)
            past = _growing_cache()
            cur = seq
            for _ in range(seqlen - 1):
                o = sampler(input_ids=cur, past_key_values=past, use_cache=True)
                past = o.past_key_values
                cur = top_k_top_p_sample(o.logits[:, -1, :].cpu(), top_k, top_p, gen).to(device)
                seq = torch.cat([seq, cur], dim=1)
            out.append(seq.cpu())
            progress.update(task, advance=bs)
    del sampler
    ids = torch.cat(out, 0)
    write_with(path, lambda f: torch.save(ids, f))  # atomic: a concurrent run never reads half a cache file
    return ids
