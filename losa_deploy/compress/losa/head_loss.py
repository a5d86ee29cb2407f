"""LoSA's training losses from the decoder's hidden states, a chunk of tokens at a time, for a frozen LM head.

Why not `model(labels=...)` or logits: transformers materialises fp32 logits for every token ([tokens, vocab],
200 MB for a 4 x 256 batch of a 49k vocabulary), then a log-softmax and its backward over them; on 2 cores that was
a quarter of a LoSA training step (2026-12-03, Sapphire-Rapids-class VM). The head is frozen in LoSA (only the
adapters train), so the only gradient a loss sends back is `dL/dlogits W` for the hidden states: computed in the
forward, chunk by chunk, with the same values and gradients as the logits form (tested against it).

Each chunk's softmax, loss and dLoss/dlogits run in the sparse-cpu library's fused row kernels (`sp_kl_rows`,
`sp_ce_rows`, csrc/headloss.c) on CPU: PyTorch's ~10 passes over the fp32 logits were 18% of a distillation step,
the fused rows 12x faster (2026-12-04, AVX-512 VM). `LOSA_DEPLOY_HEAD_KERNEL=torch` keeps PyTorch's ops; `auto`
(default) falls back to them where the library cannot be built or the tensors are not on the CPU.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ...errors import UserError
from ..recipe import TEACHER_OBJECTIVES

IGNORE = -100
_CHUNK = 256  # tokens per chunk: 256 x 49k fp32 logits = 50 MB at a time

# (start, end, logits) -> the chunk's share of the loss; turns `logits` (fp32, in place) into dLoss/dlogits
ChunkLoss = Callable[[int, int, Tensor], Tensor]


class _HeadLoss(torch.autograd.Function):
    """`sum over chunks of chunk_loss(h W^T)`, with the gradient for `h` only (`weight` is frozen and already in the
    compute dtype). A chunk's fp32 logits go to one buffer reused for every chunk: a fresh 50 MB tensor per chunk
    cost more than the exponentials (first-touch page faults)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, chunk_loss: ChunkLoss) -> Tensor:
        dtype = weight.dtype
        grad = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        buf = torch.empty((min(_CHUNK, hidden.shape[0]), weight.shape[0]), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], _CHUNK):
            e = min(s + _CHUNK, hidden.shape[0])
            p = buf[: e - s]
            p.copy_(hidden[s:e].to(dtype) @ weight.t())
            total += chunk_loss(s, e, p)
            grad[s:e] = p.to(dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * g).to(ctx.hidden_dtype), None, None


HEAD_KERNEL_ENV = "LOSA_DEPLOY_HEAD_KERNEL"
HEAD_KERNELS = ("auto", "native", "torch")
_AUTO_FAILED = False


def head_kernel() -> str:
    """"native" (the fused C rows) or "torch", from LOSA_DEPLOY_HEAD_KERNEL (auto: native where it builds)."""
    name = (os.environ.get(HEAD_KERNEL_ENV) or "auto").strip().lower()
    if name not in HEAD_KERNELS:
        raise UserError(f"unknown {HEAD_KERNEL_ENV}='{name}': use one of {', '.join(HEAD_KERNELS)}")
    if name == "torch":
        return "torch"
    global _AUTO_FAILED
    if name == "auto" and _AUTO_FAILED:
        return "torch"  # a failed build is not retried for every training slice
    try:
        from ...sparse_cpu._lib import load

        load()
    except UserError:
        if name == "native":
            raise
        _AUTO_FAILED = True
        return "torch"
    return "native"


def _native_rows(p: Tensor, w: Tensor, teacher: Tensor | None = None, targets: Tensor | None = None) -> Tensor:
    """The fused row kernel on one chunk: `p` (fp32 logits, contiguous) becomes dLoss/dlogits; returns the loss."""
    from ...sparse_cpu._lib import load

    lib = load()
    rows, n = p.shape
    w = w.to(torch.float32).contiguous()
    loss = torch.empty(rows, dtype=torch.float64)
    if teacher is not None:
        t = teacher.contiguous()
        rc = lib.sp_kl_rows(rows, n, p.data_ptr(), t.data_ptr(), int(t.dtype == torch.bfloat16), w.data_ptr(),
                            loss.data_ptr())
    else:
        assert targets is not None
        y = targets.to(torch.int64).contiguous()
        rc = lib.sp_ce_rows(rows, n, p.data_ptr(), y.data_ptr(), w.data_ptr(), loss.data_ptr())
    if rc != 0:
        raise RuntimeError(f"the fused head-loss kernel failed with code {rc}")
    return loss.sum().to(torch.float32)


def _native_ok(p: Tensor, native: bool, *others: Tensor) -> bool:
    ok = p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
    return native and ok and all(o.device.type == "cpu" and o.dtype in (torch.float32, torch.bfloat16) for o in others)


def _log_softmax_(logits: Tensor) -> Tensor:
    """In place; returns the same tensor holding log-probabilities."""
    peak = logits.amax(dim=-1, keepdim=True)
    logits.sub_(peak)
    return logits.sub_(logits.exp().sum(dim=-1, keepdim=True).log_())


def cross_entropy_chunks(targets: Tensor, native: bool = False) -> ChunkLoss:
    """Mean over targets != IGNORE of -log softmax(logits)[target]."""
    valid = (targets != IGNORE).to(torch.float32)
    n = valid.sum().clamp_min(1.0)
    safe = targets.clamp_min(0)

    def chunk(s: int, e: int, p: Tensor) -> Tensor:
        t, w = safe[s:e], valid[s:e] / n
        if _native_ok(p, native):
            return _native_rows(p, w, targets=t)
        rows = torch.arange(e - s, device=p.device)
        _log_softmax_(p)
        loss = -(p[rows, t] * w).sum()
        p.exp_().mul_(w[:, None])
        p[rows, t] -= w
        return loss

    return chunk


def kl_chunks(teacher_hidden: Tensor, teacher_weight: Tensor, valid: Tensor, native: bool = False) -> ChunkLoss:
    """Mean over valid positions of KL(teacher || student) of the next-token distributions (temperature 1)."""
    v = valid.to(torch.float32)
    n = v.sum().clamp_min(1.0)

    def chunk(s: int, e: int, p: Tensor) -> Tensor:
        w = v[s:e] / n
        logits = teacher_hidden[s:e].to(teacher_weight.dtype) @ teacher_weight.t()
        if _native_ok(p, native, logits):
            return _native_rows(p, w, teacher=logits)
        t = _log_softmax_(logits.float())
        _log_softmax_(p)
        pt = t.exp()
        loss = ((pt * (t - p)).sum(-1) * w).sum()
        p.exp_().sub_(pt).mul_(w[:, None])  # (student - teacher probabilities) w
        return loss

    return chunk


def hidden_mse(student: Sequence[Tensor], teacher: Sequence[Tensor], valid: Tensor) -> Tensor:
    """SquareHead's feature term (Kurtic et al. 2023, "Sparse Fine-tuning for Inference Acceleration of LLMs"): the
    sum over layers of MSE(student, teacher) / MSE(teacher, 0) at valid positions.

    Why: at high sparsity the next-token KL alone is a weak signal for 30 blocks of damage; matching every block's
    output gives each adapter a target of its own, and dividing by the teacher's energy puts every layer on one scale.
    """
    v = valid.reshape(-1).to(torch.float32)
    total = torch.zeros((), dtype=torch.float32, device=valid.device)
    for hs, ht in zip(student, teacher, strict=True):
        hs2 = hs.reshape(-1, hs.shape[-1]).float()
        ht2 = ht.reshape(-1, ht.shape[-1]).float()
        err = ((hs2 - ht2).square().sum(-1) * v).sum()
        energy = (ht2.square().sum(-1) * v).sum().clamp_min(1e-12)
        total = total + err / energy
    return total


def head_loss_applies(model: nn.Module) -> bool:
    """True where the model's logits are exactly `lm_head(decoder(x))` and the head is frozen.

    Models that scale or soft-cap their logits (Gemma-2's `final_logit_softcapping`, Cohere's `logit_scale`,
    Granite's `logits_scaling`) keep the logits form."""
    cfg = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    decoder = getattr(model, "model", None)
    if cfg is None or not isinstance(head, nn.Linear) or head.bias is not None or decoder is None:
        return False
    if head.weight.requires_grad:
        return False
    return not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, valid: Tensor) -> Tensor:
    """The logits form of `kl_chunks`: mean over valid positions of KL(teacher || student), temperature 1."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    v = valid.to(kl.dtype)
    return (kl * v).sum() / v.sum().clamp_min(1.0)


class TrainLoss:
    """LoSA's objective on a batch: "lm" (transformers' causal-LM loss: labels shifted by one, IGNORE skipped),
    "distill" (KL to the frozen dense teacher at every valid position) or "squarehead" (that KL plus `hidden_mse` of
    every block's output).

    Built once per training slice: the frozen heads' weights are cast to the autocast dtype here, not per batch."""

    def __init__(self, model: nn.Module, objective: str, teacher: nn.Module | None,
                 autocast_dtype: torch.dtype | None) -> None:
        if objective in TEACHER_OBJECTIVES and teacher is None:
            raise ValueError(f"the {objective} objective needs a teacher")
        self.model, self.objective, self.teacher = model, objective, teacher
        chunked = head_loss_applies(model) and (teacher is None or head_loss_applies(teacher))
        cast = (lambda w: w.to(autocast_dtype)) if autocast_dtype is not None else (lambda w: w)
        self.head = cast(model.lm_head.weight.detach()) if chunked else None
        self.kernel = head_kernel() if chunked else "torch"
        self.teacher_head = cast(teacher.lm_head.weight.detach()) if chunked and teacher is not None else None

    @property
    def form(self) -> str:
        return "chunked-head" if self.head is not None else "logits"

    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        ids, att = batch["input_ids"], batch.get("attention_mask")
        if self.objective in TEACHER_OBJECTIVES:
            assert self.teacher is not None
            valid = att.bool() if att is not None else torch.ones_like(ids, dtype=torch.bool)
            hidden = self.objective == "squarehead"
            fwd = dict(input_ids=ids, attention_mask=att, use_cache=False, output_hidden_states=hidden)
            body = (lambda m: m) if self.head is None else (lambda m: m.model)  # the chunked form skips the head
            with torch.no_grad():
                t_out = body(self.teacher)(**fwd)
            s_out = body(self.model)(**fwd)
            if self.head is None:
                loss = distill_loss(s_out.logits, t_out.logits, valid)
            else:
                h, th = s_out.last_hidden_state, t_out.last_hidden_state
                d = h.shape[-1]
                loss = _HeadLoss.apply(h.reshape(-1, d), self.head,
                                       kl_chunks(th.reshape(-1, d), self.teacher_head, valid.reshape(-1),
                                                 native=self.kernel == "native"))
            if hidden:
                # hidden_states[0] is the embedding output: not pruned, equal on both sides
                loss = loss + hidden_mse(s_out.hidden_states[1:], t_out.hidden_states[1:], valid)
            return loss
        if self.head is None:
            return self.model(**batch, use_cache=False).loss
        hidden = self.model.model(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return _HeadLoss.apply(h, self.head, cross_entropy_chunks(batch["labels"][:, 1:].reshape(-1),
                                                                  native=self.kernel == "native"))
