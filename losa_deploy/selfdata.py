"""Data-free calibration: text sampled from the model itself, seeded and cached.

Each sequence starts from a random vocabulary token (as in LLM-QAT's data-free generation) and is sampled with
top-p 0.95 (within the top 1024 tokens), so the windows cover what the model itself finds likely. A share of the
sequences (`prompted`) can instead answer a request for a long piece of prose of a random genre and topic; only the
answer is kept, so those windows read as documents rather than as continuations of a random token.
"""

from __future__ import annotations

import hashlib
import inspect
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .models import cache_dir, pad_token_id


# Bumped whenever the sampler draws differently for the same seed, so a cache never mixes two samplers' text.
SAMPLER_VERSION = 5


# Bumped whenever prompted sequences are drawn differently (prompts, genres, topics, what is kept).
PROMPT_VERSION = 1
# A prompted sequence asks for "Write a long {genre} about {topic}.", one of the 12 x 48 requests drawn per sequence:
# everyday written prose of many registers and subjects, so the answers are not one kind of document on one theme
# (with the genres alone the answers of a genre repeat a few openings).
PROMPT_GENRES = (
    "news article", "encyclopedia article", "blog post", "short story", "product review", "history essay",
    "biography", "travel guide", "recipe with background", "science explainer", "opinion column", "sports report",
)
PROMPT_TOPICS = (
    "history", "physics", "chemistry", "biology", "medicine", "music", "film", "painting", "architecture", "football",
    "cricket", "tennis", "cooking", "gardening", "economics", "finance", "law", "politics", "religion", "philosophy",
    "mathematics", "computers", "video games", "space exploration", "astronomy", "geology", "the ocean", "weather",
    "farming", "railways", "aviation", "ships", "education", "languages", "literature", "poetry", "theatre",
    "fashion", "a war", "a city", "a river", "a mountain range", "a famous scientist", "a king", "an animal",
    "a plant", "a company", "an invention",
)
PROMPT_TEMPLATE = "Write a long {genre} about {topic}."
# The attention function of padded prompted batches (registered with transformers on first use).
_GQA_SDPA = "losa_gqa_sdpa"


def _cache_key(model: Any, nsamples: int, seqlen: int, seed: int, prompted: float = 0.0) -> str:
    name = str(getattr(model.config, "_name_or_path", "")) + str(model.config.to_json_string())
    recipe = f"|prompted{PROMPT_VERSION}:{prompted:.6g}" if prompted > 0 else ""  # share 0 keeps earlier names
    h = hashlib.sha256(f"{name}|{nsamples}|{seqlen}|{seed}|sampler{SAMPLER_VERSION}{recipe}".encode()).hexdigest()
    return f"self-{h[:16]}.pt"


def prompt_requests() -> list[str]:
    """Every request a prompted sequence can answer, in a fixed order (the sampler draws an index)."""
    return [PROMPT_TEMPLATE.format(genre=g, topic=t) for g in PROMPT_GENRES for t in PROMPT_TOPICS]


def prompt_ids(tokenizer: Any, request: str) -> list[int]:
    """The token ids of one request: a user turn of the tokenizer's chat template with the assistant's turn opened,
    or, for a tokenizer without a template (a base model), the request as plain text and a blank line."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template holds its own markers
    return list(tokenizer(request + "\n\n", add_special_tokens=True)["input_ids"])


def banned_ids(tokenizer: Any) -> list[int]:
    """Special and added tokens (chat markers, end of text): never sampled in a prompted answer, so an answer runs
    the whole window instead of closing its turn and starting a new conversation."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return sorted({int(i) for i in added} | set(getattr(tokenizer, "all_special_ids", None) or []))


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


def _gqa_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, but grouped-query heads stay grouped when a padding mask is given.

    Why: transformers expands every key / value head to its query heads whenever there is a mask (CUDA's fused
    kernels need that), which on CPU copies the whole KV cache at every decode step: over 250 steps a left-padded
    128-row batch decoded at 302 tokens/s against 411 unpadded, and at 394 with the heads kept grouped
    (scripts/padded_decode.py, 2026-12-05, AMD EPYC VM)."""
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    causal = query.shape[2] > 1 and attention_mask is None
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def grouped_query_attention(model: Any) -> Iterator[None]:
    """Run an SDPA model's attention through `_gqa_sdpa` inside the block, then restore its own. Any other
    attention (eager for soft-capping, flash) is left alone; so is a transformers without attention registries."""
    impl = getattr(model.config, "_attn_implementation", None)
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        impl = None
    if impl != "sdpa" or not hasattr(model, "set_attn_implementation"):
        yield
        return
    AttentionInterface.register(_GQA_SDPA, _gqa_sdpa)
    AttentionMaskInterface.register(_GQA_SDPA, sdpa_mask)  # the same boolean masks as SDPA's
    model.set_attn_implementation(_GQA_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation(impl)


def _last_logits_kwargs(model: Any) -> dict[str, Any]:
    """Ask for the last position's logits only where the model's forward can (a prompt's 36 rows of a 49k vocabulary
    for 128 sequences are 0.9 GB of float32 logits otherwise)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _answer_batch(sampler: Any, prompts: list[list[int]], n_new: int, gen: torch.Generator, top_k: int, top_p: float,
                  banned: list[int], pad_id: int) -> torch.Tensor:
    """[len(prompts), n_new] tokens sampled after each prompt (left-padded and masked, so prompts of different
    lengths share one batch), with `banned` never drawn. The prompts themselves are not returned."""
    device = next(sampler.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    last = _last_logits_kwargs(sampler)
    o = sampler(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=_growing_cache(),
                use_cache=True, **last)
    new = []
    for step in range(n_new):
        logits = o.logits[:, -1, :].float().cpu()
        logits[:, banned] = float("-inf")
        cur = top_k_top_p_sample(logits, top_k, top_p, gen).to(device)
        new.append(cur)
        if step == n_new - 1:
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        pos = pos[:, -1:] + 1
        o = sampler(input_ids=cur, attention_mask=mask, position_ids=pos, past_key_values=o.past_key_values,
                    use_cache=True, **last)
    return torch.cat(new, dim=1).cpu()


def _random_start_batch(sampler: Any, bs: int, seqlen: int, gen: torch.Generator, top_k: int, top_p: float,
                        vocab: int, special: set[int]) -> torch.Tensor:
    """[bs, seqlen] tokens: a random non-special first token, then `seqlen - 1` sampled ones."""
    device = next(sampler.parameters()).device
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
    return seq.cpu()


@torch.no_grad()
def generate_self_ids(
    model: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0, batch_size: int = 128, top_p: float = 0.95,
    top_k: int = 1024, prompted: float = 0.0,
) -> torch.Tensor:
    """[nsamples, seqlen] token ids sampled from `model`. Cached per model, size, seed and `prompted` share.

    Wide batches: a decode step of a small model is bound by reading its weights, so 128 sequences per step cost
    little more than 16; generating the LoSA profiles' training text dominated a fresh run's set-up at 16.
    bf16 autocast where the CPU computes bf16 natively: 1.4x the tokens per second of fp32 at 64 rows
    (2026-12-02, Sapphire-Rapids-class VM, 340 -> 478 tok/s; 128 rows bf16: 516). A bf16 copy of the model and
    a bound of the nucleus to the top 1024 tokens (sampler 5) raised that further (see docs/measured/losa-budget.md).

    `prompted` in [0, 1]: that share of the sequences (rounded) answers a prompt (`prompt_ids`, a request drawn per
    sequence); the rest start from a random token. The two kinds are shuffled together, so any prefix of the rows
    (the calibration windows are the first training sequences) holds both."""
    from .precision import autocast_ctx, bf16_autocast_supported
    from .progress import make_progress

    from .atomic import write_with

    path = cache_dir() / "selfdata" / _cache_key(model, nsamples, seqlen, seed, prompted)
    if path.is_file():
        try:
            ids = torch.load(path)
            if tuple(ids.shape) == (nsamples, seqlen):
                return ids
        except Exception:
            pass
    gen = torch.Generator().manual_seed(seed)
    n_prompted = int(round(min(max(prompted, 0.0), 1.0) * nsamples))
    device = next(model.parameters()).device
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    use_bf16 = bf16_autocast_supported(str(device))
    sampler = _generation_copy(model, use_bf16)
    with make_progress(transient=True) as progress, autocast_ctx(str(device), use_bf16):
        task = progress.add_task("generating self-calibration text", total=nsamples)
        for b0 in range(0, nsamples - n_prompted, batch_size):
            bs = min(batch_size, nsamples - n_prompted - b0)
            out.append(_random_start_batch(sampler, bs, seqlen, gen, top_k, top_p, model.config.vocab_size, special))
            progress.update(task, advance=bs)
        if n_prompted:
            prompts = [prompt_ids(tokenizer, r) for r in prompt_requests()]
            banned, pad_id = banned_ids(tokenizer), pad_token_id(tokenizer)
            with grouped_query_attention(sampler):
                for b0 in range(0, n_prompted, batch_size):
                    bs = min(batch_size, n_prompted - b0)
                    drawn = torch.randint(0, len(prompts), (bs,), generator=gen).tolist()
                    out.append(_answer_batch(sampler, [prompts[i] for i in drawn], seqlen, gen, top_k, top_p,
                                             banned, pad_id))
                    progress.update(task, advance=bs)
    del sampler
    ids = torch.cat(out, 0)
    if n_prompted:
        ids = ids[torch.randperm(nsamples, generator=gen)]
    write_with(path, lambda f: torch.save(ids, f))  # atomic: a concurrent run never reads half a cache file
    return ids
