"""bf16 autocast where the hardware computes bf16 natively (LoSA training, self-text generation)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def bf16_autocast_supported(device: str) -> bool:
    """bf16 autocast only where the hardware computes bf16 natively (emulated bf16 on CPU is slower than fp32)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    if not ({"avx512_bf16", "amx_bf16"} & set(flags)):
        return False
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.ones(4, 4) @ torch.ones(4, 4)
        return y.dtype == torch.bfloat16
    except Exception:
        return False


def autocast_ctx(device: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
