"""Next-token loss from the decoder's hidden states, a chunk of tokens at a time, for a frozen LM head.

Why not `model(labels=...)`: transformers materialises fp32 logits for every token ([tokens, vocab], 200 MB for a
4 x 256 batch of a 49k vocabulary), then a log-softmax and its backward over them; on 2 cores that was a quarter of a
LoSA training step (2026-12-03, Sapphire-Rapids-class VM). The head is frozen in LoSA (only the adapters train), so
the gradient the loss sends back is just `(softmax - onehot) W / n` for the hidden states: computed in the forward,
chunk by chunk, with the same value and gradient as the transformers loss (tested against it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

IGNORE = -100
_CHUNK = 256  # tokens per chunk: 256 x 49k fp32 logits = 50 MB at a time


class _HeadCrossEntropy(torch.autograd.Function):
    """mean over targets != IGNORE of `logsumexp(h W^T) - (h W^T)[target]`; gradient for `h` only.

    `weight` is already in the compute dtype. The fp32 logits of a chunk go to one buffer reused for every chunk:
    a fresh 50 MB tensor per chunk cost more than the exponentials (first-touch page faults)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        dtype = weight.dtype
        valid = targets != IGNORE
        n = valid.sum().clamp_min(1).to(torch.float32)
        grad = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        buf = torch.empty((min(_CHUNK, hidden.shape[0]), weight.shape[0]), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], _CHUNK):
            e = min(s + _CHUNK, hidden.shape[0])
            p = buf[: e - s]
            p.copy_(hidden[s:e].to(dtype) @ weight.t())  # the logits, then the softmax in place
            t, v = targets[s:e].clamp_min(0), valid[s:e].to(torch.float32)
            target_logit = p.gather(1, t[:, None])[:, 0]
            peak = p.amax(dim=-1, keepdim=True)
            p.sub_(peak).exp_()
            z = p.sum(dim=-1, keepdim=True)
            total += ((peak[:, 0] + z[:, 0].log() - target_logit) * v).sum()
            p.mul_((v / n)[:, None] / z)
            p[torch.arange(e - s, device=p.device), t] -= v / n
            grad[s:e] = p.to(dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total / n

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * g).to(ctx.hidden_dtype), None, None


def head_loss_applies(model: nn.Module) -> bool:
    """True where the model's logits are exactly `lm_head(decoder(x))` and the head is frozen.

    Models that scale or soft-cap their logits (Gemma-2's `final_logit_softcapping`, Cohere's `logit_scale`,
    Granite's `logits_scaling`) keep transformers' own loss."""
    cfg = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    decoder = getattr(model, "model", None)
    if cfg is None or not isinstance(head, nn.Linear) or head.bias is not None or decoder is None:
        return False
    if head.weight.requires_grad:
        return False
    return not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


class LMLoss:
    """transformers' causal-LM loss (labels shifted by one, IGNORE skipped, mean over the rest) of `model`.

    Built once per training slice: the frozen head's weight is cast to the autocast dtype here, not per batch."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None) -> None:
        self.model = model
        self.head: Tensor | None = None
        if head_loss_applies(model):
            w = model.lm_head.weight.detach()
            self.head = w.to(autocast_dtype) if autocast_dtype is not None else w

    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        if self.head is None:
            return self.model(**batch, use_cache=False).loss
        hidden = self.model.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                  use_cache=False).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return _HeadCrossEntropy.apply(h, self.head, batch["labels"][:, 1:].reshape(-1))
