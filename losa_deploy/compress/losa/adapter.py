"""Masked LoRA adapters: `y = W x + (alpha/r) ((B A) ⊙ M) x`, merged as `W + (alpha/r)(B A) ⊙ M`.

Why not PEFT: a PEFT LoRA layer replaces each `nn.Linear` with a `LoraLayer` wrapper, which the sequential
pruning pipeline (`model_parts.find_linears`, by `isinstance(nn.Linear)`) would no longer see, and its
merge/unmerge assume an unmasked update with a fixed per-layer rank. LoSA needs the opposite at every step:
merge into plain linears, prune them with the shared pipeline, un-merge against the *new* mask, and change each
block's active rank. A small adapter attached with a forward hook keeps the base model's modules untouched
(the pipeline, `save_pretrained` and vanilla transformers see ordinary linears) and keeps the mask explicit.

Adapters are allocated once at `r_max` (the rank cap) and the active rank `r <= r_max` slices A and B, so a rank
never exceeds what was allocated (the reference allocates r=8 and silently caps ranks up to 16 at 8).
"""

from __future__ import annotations

import math
import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn
import torch.nn.functional as F


class MaskedLoRA(nn.Module):
    """One linear's adapter. A: [r_max, in], B: [out, r_max]; `rank` active components; `mask` bool [out, in]."""

    def __init__(self, in_features: int, out_features: int, r_max: int, alpha: float, dropout: float,
                 mask: Tensor | None = None, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        super().__init__()
        if r_max < 1:
            raise ValueError(f"r_max must be >= 1 (got {r_max})")
        self.r_max = int(r_max)
        self.rank = int(r_max)
        self.alpha = float(alpha)
        self.A = nn.Parameter(torch.empty(r_max, in_features, device=device, dtype=torch.float32))
        self.B = nn.Parameter(torch.zeros(out_features, r_max, device=device, dtype=torch.float32))
        # PEFT's default init: kaiming-uniform A (a = sqrt(5)), zero B, so the update starts at exactly 0.
        bound = 1.0 / math.sqrt(in_features)  # = kaiming_uniform_(a=sqrt(5)) bound for fan_in = in_features
        with torch.no_grad():
            self.A.uniform_(-bound, bound, generator=generator)
        m = torch.ones(out_features, in_features, dtype=torch.bool, device=device) if mask is None else mask.to(device)
        self.register_buffer("mask", m.bool(), persistent=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        # (base weight, mask) in the autocast dtype while training under autocast: see AdapterSet.training
        self.base_lp: tuple[Tensor, Tensor] | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        """(alpha/r) (B[:, :r] A[:r]) ⊙ M, fp32 [out, in]: exactly 0 wherever the mask is False."""
        r = self.rank
        d = (self.B[:, :r] @ self.A[:r]) * self.scaling
        return d * self.mask.to(d.dtype)

    def forward(self, x: Tensor) -> Tensor:
        d = self.delta()
        x = self.dropout(x)
        return F.linear(x.to(d.dtype) if not torch.is_autocast_enabled() else x, d)


def _hook(adapter: MaskedLoRA):
    def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        if not adapter.enabled:
            return out
        return out + adapter(args[0]).to(out.dtype)

    return hook


class _FusedForward:
    """`y = x (W + delta)^T + b` in one matmul, for adapters without dropout on fp32 linears.

    The hook form costs two token-sized matmuls forward and three backward (grad through W, grad through delta,
    grad of delta); with one input for both terms they share a single weight: one forward and two backward,
    i.e. 3/5 of the linear work of a training step, with the same function and gradients.
    Installed as the instance's `forward`; `remove()` restores the class's.
    """

    def __init__(self, linear: nn.Linear, adapter: MaskedLoRA) -> None:
        self.linear, self.adapter = linear, adapter
        linear.forward = self  # type: ignore[method-assign]

    def __call__(self, x: Tensor) -> Tensor:
        lin, a = self.linear, self.adapter
        if not a.enabled:
            return F.linear(x, lin.weight, lin.bias)
        lp = a.base_lp
        dev = x.device.type
        if lp is not None and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == lp[0].dtype:
            # W + (s B A) ⊙ M in one pass over bf16 tensors; the fp32 form adds in fp32, then autocast casts the sum
            r = a.rank
            ba = (a.B[:, :r] * a.scaling) @ a.A[:r]
            return F.linear(x, torch.addcmul(lp[0], ba.to(lp[0].dtype), lp[1]), lin.bias)
        return F.linear(x, lin.weight + a.delta(), lin.bias)

    def remove(self) -> None:
        if self.linear.__dict__.get("forward") is self:
            del self.linear.forward


def _fusable(linear: nn.Linear, adapter: MaskedLoRA) -> bool:
    no_dropout = isinstance(adapter.dropout, nn.Identity)
    return no_dropout and linear.weight.dtype == torch.float32 and type(linear) is nn.Linear


@dataclass
class AdapterSet:
    """Adapters of every pruned linear, keyed by the linear's full weight name, plus their hook handles."""

    adapters: dict[str, MaskedLoRA]
    linears: dict[str, nn.Linear]
    block_of: dict[str, int]
    handles: list
    form: str = "hook"  # "fused" (one matmul per linear), "hook" (adapter beside the linear) or "mixed"

    def parameters(self) -> Iterable[nn.Parameter]:
        for name in sorted(self.adapters):
            yield self.adapters[name].A
            yield self.adapters[name].B

    def set_enabled(self, on: bool) -> None:
        for a in self.adapters.values():
            a.enabled = on

    def train(self, on: bool = True) -> None:
        for a in self.adapters.values():
            a.train(on)

    @contextlib.contextmanager
    def training(self, autocast_dtype: torch.dtype | None) -> Iterator[None]:
        """Adapters in train mode; under autocast the fused linears read a copy of their frozen base weight and mask
        in the autocast dtype, made once here instead of casting `W + delta` from fp32 at every forward (with the
        fp32 mask product, a third of a bf16 training step on 2 cores). The base weights must not change inside:
        they do not (training moves only A and B), and the copies are dropped on exit."""
        self.train(True)
        if autocast_dtype is not None and self.form == "fused":
            for name, a in self.adapters.items():
                w = self.linears[name].weight.detach()
                a.base_lp = (w.to(autocast_dtype), a.mask.to(autocast_dtype))
        try:
            yield
        finally:
            for a in self.adapters.values():
                a.base_lp = None
            self.train(False)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, a in self.adapters.items():
            out[f"{name}.A"] = a.A.detach().cpu().clone()
            out[f"{name}.B"] = a.B.detach().cpu().clone()
            out[f"{name}.mask"] = a.mask.cpu().clone()
        return out

    def ranks(self) -> dict[str, int]:
        return {n: a.rank for n, a in self.adapters.items()}

    def load_state_dict(self, state: dict[str, Tensor], ranks: dict[str, int]) -> None:
        with torch.no_grad():
            for name, a in self.adapters.items():
                a.A.copy_(state[f"{name}.A"])
                a.B.copy_(state[f"{name}.B"])
                a.mask.copy_(state[f"{name}.mask"])
                a.rank = int(ranks[name])


def attach_adapters(linears: dict[str, tuple[int, nn.Linear]], r_max: int, alpha: float, dropout: float,
                    seed: int = 0) -> AdapterSet:
    """A masked adapter (all-ones mask, zero update) on each `{full weight name: (block, linear)}`.

    Without dropout the adapter is fused into the linear's forward (one matmul, `_FusedForward`); with dropout the
    adapter reads a dropped-out copy of the input, so it runs beside the linear as a forward hook.

    While the mask stays all ones this is a plain, unmasked LoRA (`merge_into` then adds B A everywhere): the
    dense-lora baseline (`baseline.run_dense_lora`) uses the adapters so, LoSA sets each mask after pruning.
    """
    gen = torch.Generator().manual_seed(seed)
    adapters: dict[str, MaskedLoRA] = {}
    lin_map: dict[str, nn.Linear] = {}
    block_of: dict[str, int] = {}
    handles = []
    for name in sorted(linears):
        bi, lin = linears[name]
        a = MaskedLoRA(lin.in_features, lin.out_features, r_max, alpha, dropout, device="cpu", generator=gen)
        a.to(lin.weight.device)
        adapters[name], lin_map[name], block_of[name] = a, lin, bi
        handles.append(_FusedForward(lin, a) if _fusable(lin, a) else lin.register_forward_hook(_hook(a)))
    kinds = {"fused" if isinstance(h, _FusedForward) else "hook" for h in handles}
    return AdapterSet(adapters, lin_map, block_of, handles, kinds.pop() if len(kinds) == 1 else "mixed")


@torch.no_grad()
def merge_into(weight: Tensor, adapter: MaskedLoRA) -> None:
    """W <- W + (alpha/r)(B A) ⊙ M in place (in fp32, cast back): off-mask entries of W are left untouched."""
    d = adapter.delta().detach()
    keep = adapter.mask
    w32 = weight.float()
    w32[keep] += d[keep]
    weight.copy_(w32.to(weight.dtype))


@torch.no_grad()
def unmerge_from(weight: Tensor, adapter: MaskedLoRA) -> None:
    """W_base <- W - (alpha/r)(B A) ⊙ M in place, so W_base + delta ⊙ M reproduces W on the mask."""
    d = adapter.delta().detach()
    keep = adapter.mask
    w32 = weight.float()
    w32[keep] -= d[keep]
    weight.copy_(w32.to(weight.dtype))


@torch.no_grad()
def set_rank(weight: Tensor, adapter: MaskedLoRA, new_rank: int) -> None:
    """Change the active rank without changing the layer's function.

    The update before and after differ (dropped components, and the scaling alpha/r changes), so the base
    weight absorbs the difference on the mask: W_base += (delta_old - delta_new) ⊙ M. Dropped components' B
    columns are zeroed so a component that is re-activated later starts from a zero update.
    """
    new_rank = int(new_rank)
    if not 1 <= new_rank <= adapter.r_max:
        raise ValueError(f"rank {new_rank} outside [1, {adapter.r_max}]")
    if new_rank == adapter.rank:
        return
    old = adapter.delta().detach()
    old_rank = adapter.rank
    adapter.B[:, min(new_rank, old_rank):].zero_()  # inactive and newly activated components: zero update
    adapter.rank = new_rank
    new = adapter.delta().detach()
    keep = adapter.mask
    w32 = weight.float()
    w32[keep] += (old - new)[keep]
    weight.copy_(w32.to(weight.dtype))


def check_zero_pattern(weight: Tensor, mask: Tensor, name: str = "") -> int:
    """Raise if any weight outside the mask is non-zero; return how many kept weights are exactly 0.

    Kept weights can legitimately be 0 when a block's rate fell and the mask regrew onto pruned positions
    (the adapter then grows them); every pruned position must be exactly 0.
    """
    w = weight.detach()
    m = mask.to(w.device)
    if m.shape != w.shape:
        raise AssertionError(f"{name}: mask {tuple(m.shape)} vs weight {tuple(w.shape)}")
    if bool((w[~m] != 0).any()):
        bad = int((w[~m] != 0).sum())
        raise AssertionError(f"{name}: {bad} weights outside the mask are non-zero")
    return int((w[m] == 0).sum())
