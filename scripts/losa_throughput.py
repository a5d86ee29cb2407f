"""LoSA's training and self-text throughput on the embedded model, old form against new, interleaved.

Training: one AdamW update of masked adapters (rank 24 on every prunable linear, 70% random masks, 4 x 256 tokens,
bf16 autocast where native) in two forms, alternated round by round:
  logits   transformers' loss from fp32 logits, fused adapters casting `W + delta` from fp32 at every forward;
  chunked  `head_loss.TrainLoss` from hidden states plus `AdapterSet.training` (bf16 base copies).
With `--compare head-kernel`, training instead alternates the head loss's two kernels on distillation updates (a
bf16 dense teacher, as the profiles run): PyTorch's ops against the fused C rows (`sp_kl_rows`, csrc/headloss.c).
Generation: 128 rows x 256 tokens of self text, the shipped sampler (`selfdata.generate_self_ids`: bf16 copy,
preallocated KV cache, top-k 64 then top-p 0.95) against the same sampler on the fp32 model under autocast with
transformers' default cache.

    python scripts/losa_throughput.py --rounds 3 --json runs/losa_throughput.json
    python scripts/losa_throughput.py --compare head-kernel --skip-generation --json runs/head_kernel.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _adapters(model: torch.nn.Module):
    from losa_deploy.compress.losa.adapter import attach_adapters
    from losa_deploy.model_parts import prunable_linears

    model.requires_grad_(False)
    lin = prunable_linears(model, [])
    aset = attach_adapters(lin, r_max=24, alpha=32.0, dropout=0.0, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in aset.adapters.values():
            a.mask.copy_(torch.rand(a.mask.shape, generator=g) > 0.7)
            a.B.normal_(std=1e-3, generator=g)
    return aset


def train_rates(model, rounds: int, updates: int, bf16: bool) -> dict[str, list[float]]:
    from losa_deploy.compress.losa.head_loss import TrainLoss
    from losa_deploy.precision import autocast_ctx

    aset = _adapters(model)
    params = list(aset.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rates: dict[str, list[float]] = {"logits": [], "chunked": []}
    for _ in range(rounds):
        for form in rates:
            new = form == "chunked"
            ctx = aset.training(torch.bfloat16 if bf16 else None) if new else contextlib.nullcontext()
            with ctx:
                loss_fn = TrainLoss(model, "lm", None, torch.bfloat16 if bf16 else None) if new else None
                for i in range(updates + 1):  # the first update warms up
                    if i == 1:
                        t0 = time.perf_counter()
                    with autocast_ctx("cpu", bf16):
                        loss = loss_fn(batch) if loss_fn else model(**batch, use_cache=False).loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                rates[form].append(updates * ids.numel() / (time.perf_counter() - t0))
    aset.remove()
    return rates


def head_kernel_rates(model, rounds: int, updates: int, bf16: bool) -> dict[str, list[float]]:
    """Distillation updates with the chunked head loss, PyTorch's ops against the fused C rows, alternated."""
    import copy

    from losa_deploy.compress.losa.head_loss import HEAD_KERNEL_ENV, TrainLoss
    from losa_deploy.precision import autocast_ctx

    aset = _adapters(model)
    teacher = copy.deepcopy(model).eval()
    if bf16:
        teacher.to(torch.bfloat16)
    params = list(aset.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rates: dict[str, list[float]] = {"torch": [], "native": []}
    before = os.environ.get(HEAD_KERNEL_ENV)
    try:
        for _ in range(rounds):
            for form in rates:
                os.environ[HEAD_KERNEL_ENV] = form
                with aset.training(torch.bfloat16 if bf16 else None):
                    loss_fn = TrainLoss(model, "distill", teacher, torch.bfloat16 if bf16 else None)
                    assert loss_fn.kernel == form
                    for i in range(updates + 1):  # the first update warms up
                        if i == 1:
                            t0 = time.perf_counter()
                        with autocast_ctx("cpu", bf16):
                            loss = loss_fn(batch)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                rates[form].append(updates * ids.numel() / (time.perf_counter() - t0))
    finally:
        if before is None:
            os.environ.pop(HEAD_KERNEL_ENV, None)
        else:
            os.environ[HEAD_KERNEL_ENV] = before
    aset.remove()
    return rates


def generation_rates(model, tok, rounds: int, bf16: bool) -> dict[str, list[float]]:
    from losa_deploy import selfdata

    rates: dict[str, list[float]] = {"autocast-fp32, default cache": [], "shipped": []}
    orig_copy, orig_cache = selfdata._generation_copy, selfdata._growing_cache
    for r in range(rounds):
        for form in rates:
            with tempfile.TemporaryDirectory() as d:
                os.environ["LOSA_DEPLOY_CACHE"] = d  # nothing cached: every round generates
                if form != "shipped":
                    selfdata._generation_copy = lambda m, use_bf16: m
                    selfdata._growing_cache = lambda: None
                try:
                    t0 = time.perf_counter()
                    selfdata.generate_self_ids(model, tok, 128, 256, seed=r)
                    rates[form].append(128 * 256 / (time.perf_counter() - t0))
                finally:
                    selfdata._generation_copy, selfdata._growing_cache = orig_copy, orig_cache
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--updates", type=int, default=4, help="timed training updates per form and round")
    ap.add_argument("--json", type=Path, default=Path("runs/losa_throughput.json"))
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--compare", choices=("forms", "head-kernel"), default="forms",
                    help="training: logits form vs chunked form (forms), or the head loss's two kernels")
    args = ap.parse_args()

    from losa_deploy.models import load_model
    from losa_deploy.precision import bf16_autocast_supported

    bf16 = bf16_autocast_supported("cpu")
    model, tok = load_model("smollm2-135m")
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
                 "bf16_autocast": bf16}
    if not args.skip_generation:
        out["generation_tok_s"] = generation_rates(model, tok, args.rounds, bf16)
    model.train()
    rate_fn = head_kernel_rates if args.compare == "head-kernel" else train_rates
    out["training_tok_s"] = rate_fn(model, args.rounds, args.updates, bf16)
    for kind in ("generation_tok_s", "training_tok_s"):
        if kind not in out:
            continue
        forms = list(out[kind])
        med = {f: statistics.median(v) for f, v in out[kind].items()}
        ratios = [b / a for a, b in zip(out[kind][forms[0]], out[kind][forms[1]])]
        out[kind + "_ratio_median"] = statistics.median(ratios)
        print(f"{kind}: " + ", ".join(f"{f} {m:.0f}" for f, m in med.items())
              + f"; per-round ratio {forms[1]} / {forms[0]}: median {statistics.median(ratios):.2f}x "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
