"""Route float32 CPU matrix products of inference code through oneDNN instead of PyTorch's default BLAS.

Why: PyTorch's CPU wheels multiply float32 matrices with MKL, which runs its AVX2 code on AMD CPUs. On this
project's AMD EPYC (Zen 5) machines `F.linear` reaches 165-200 GFLOP/s while oneDNN, which PyTorch ships anyway
(it serves bf16 and Inductor's CPU linears), reaches 300-440 GFLOP/s on the same shapes, and a calibration block
forward of the embedded model takes 14 ms instead of 25 ms (docs/benchmarks.md). Results agree to float32
rounding; the summation order differs, so masks can differ in near-ties (record the kernel with the result).

Only calls that autograd does not need are routed: LoSA's training steps keep the default path. Export never
enters this context (the traced graph must contain the standard op).

`LOSA_DEPLOY_CPU_GEMM` = `auto` (default: oneDNN when the op exists and passes a numerical probe) | `onednn`
(required; error if unusable) | `default` (PyTorch's own path).
"""

from __future__ import annotations

import contextlib
import functools
import os
from contextvars import ContextVar
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .errors import UserError

CPU_GEMM_MODES = ("auto", "onednn", "default")
ENV = "LOSA_DEPLOY_CPU_GEMM"
_ACTIVE: ContextVar[bool] = ContextVar("losa_onednn_active", default=False)


def _onednn_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@functools.lru_cache(maxsize=1)
def onednn_usable() -> bool:
    """The private oneDNN linear op exists, runs, and matches F.linear on a small float32 case."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 37, 96, generator=g)
        w = torch.randn(80, 96, generator=g)
        b = torch.randn(80, generator=g)
        ref = F.linear(x.double(), w.double(), b.double())
        got = _onednn_linear(x, w, b)
        close = bool(torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4))
        return got.shape == ref.shape and got.dtype == torch.float32 and close
    except Exception:  # noqa: BLE001 - any failure means "not usable", and we fall back
        return False


def resolve_cpu_gemm(name: str | None = None) -> str:
    """'onednn' or 'default': what the context below will do on the CPU."""
    name = (name or os.environ.get(ENV) or "auto").strip().lower()
    if name not in CPU_GEMM_MODES:
        raise UserError(f"unknown {ENV}='{name}': use one of {', '.join(CPU_GEMM_MODES)}")
    if name == "default":
        return "default"
    ok = onednn_usable()
    if name == "onednn" and not ok:
        raise UserError(f"{ENV}=onednn but this PyTorch build has no usable oneDNN linear; use auto or default")
    return "onednn" if ok else "default"


def _routable(x: Any, w: Any, b: Any) -> bool:
    if not (isinstance(x, Tensor) and isinstance(w, Tensor)) or w.dim() != 2 or x.dim() < 2:
        return False
    if x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu" or w.device.type != "cpu":
        return False
    if b is not None and (not isinstance(b, Tensor) or b.dtype != torch.float32 or b.device.type != "cpu"):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return False
    return x.shape[-1] == w.shape[1] and x.numel() > 0


class _OneDNNLinear(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if _routable(x, w, b):
                return _onednn_linear(x.contiguous(), w.contiguous(), b)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_gemm(name: str | None = None) -> Iterator[str]:
    """Within this context float32 CPU linears run on oneDNN (when resolved so); yields the kernel's name."""
    kind = resolve_cpu_gemm(name)
    if kind != "onednn" or _ACTIVE.get():
        yield "onednn" if _ACTIVE.get() else kind
        return
    token = _ACTIVE.set(True)
    try:
        with _OneDNNLinear():
            yield kind
    finally:
        _ACTIVE.reset(token)


def gram(x: Tensor) -> Tensor:
    """x^T x of a 2-D float32 matrix (tokens x features): oneDNN inside `cpu_gemm`, the default matmul outside."""
    if _ACTIVE.get() and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        xt = x.T.contiguous()
        return _onednn_linear(xt, xt, None)
    return x.T @ x
