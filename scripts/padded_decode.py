"""Decode speed of left-padded prompted self text: transformers' SDPA against `selfdata._gqa_sdpa`, interleaved.

128 rows of a 36-token prompt (half of them left-padded by one token, as prompts of different lengths are), then
`--steps` decode steps with the self-text sampler's own loop (bf16 copy where native, growing KV cache, top-k 1024
then top-p 0.95), in three forms alternated round by round:
  unpadded  no mask (every row the same length): the speed to reach;
  sdpa      the padded batch with a mask through transformers' SDPA, which expands grouped-query heads under a mask;
  gqa       the same batch through `selfdata.grouped_query_attention` (heads kept grouped, the same masks).

    python scripts/padded_decode.py --steps 250 --rounds 2 --json runs/padded_decode.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch


def decode_rate(sampler, form: str, rows: int, prompt: int, steps: int) -> float:
    from losa_deploy.selfdata import _growing_cache, grouped_query_attention, top_k_top_p_sample

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (rows, prompt), generator=g)
    mask = torch.ones_like(ids)
    if form != "unpadded":
        mask[: rows // 2, 0] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = {} if form == "unpadded" else {"attention_mask": mask, "position_ids": pos}
    ctx = grouped_query_attention(sampler) if form == "gqa" else contextlib.nullcontext()
    with ctx, torch.no_grad():
        o = sampler(input_ids=ids, past_key_values=_growing_cache(), use_cache=True, logits_to_keep=1, **kw)
        t0 = time.perf_counter()
        for _ in range(steps):
            cur = top_k_top_p_sample(o.logits[:, -1, :].float(), 1024, 0.95, g)
            if form != "unpadded":
                mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
                pos = pos[:, -1:] + 1
                kw = {"attention_mask": mask, "position_ids": pos}
            o = sampler(input_ids=cur, past_key_values=o.past_key_values, use_cache=True, logits_to_keep=1, **kw)
    return rows * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=36)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from losa_deploy.models import load_model
    from losa_deploy.precision import autocast_ctx, bf16_autocast_supported
    from losa_deploy.selfdata import _generation_copy

    model, _ = load_model(None)
    bf16 = bf16_autocast_supported("cpu")
    sampler = _generation_copy(model, bf16)
    rates: dict[str, list[float]] = {"unpadded": [], "sdpa": [], "gqa": []}
    with autocast_ctx("cpu", bf16):
        for _ in range(a.rounds):
            for form in rates:
                rates[form].append(decode_rate(sampler, form, a.rows, a.prompt, a.steps))
                print(f"{form:9s} {rates[form][-1]:7.0f} tokens/s", flush=True)
    summary = {f: statistics.median(r) for f, r in rates.items()}
    print("median tokens/s: " + ", ".join(f"{f} {v:.0f}" for f, v in summary.items()))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "bf16": bf16, "tokens_per_s": rates, "median": summary}, fh, indent=1)


if __name__ == "__main__":
    main()
