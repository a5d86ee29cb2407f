"""Pruning scores: one number per weight, higher = more worth keeping.

Scores are compared only within a row (unstructured) or within a group of M inputs of a row (N:M),
so any positive per-layer scale is irrelevant. Scores are returned in float32 whatever the weight
dtype, so that bf16/fp16 rounding cannot create spurious ties in the ranking.
"""

from __future__ import annotations

import torch
from torch import Tensor


def magnitude_scores(weight: Tensor) -> Tensor:
    """|W| as float32, shape of ``weight`` ([out, in])."""
    return weight.detach().float().abs()


def wanda_scores(weight: Tensor, input_sq_norm: Tensor) -> Tensor:
    """Wanda score ``|W_ij| * ||X_j||_2`` as float32 [out, in].

    ``input_sq_norm[j]`` is expected to be ``sum_t x_tj^2`` over all calibration tokens (the squared
    L2 norm of input feature j). Wanda's reference keeps ``scaler_row = that / n_tokens``; dividing by a
    constant does not change any per-row or per-group ranking, so either may be passed. Tiny negative
    values from accumulation round-off are clamped to 0 before the square root.
    """
    if weight.dim() != 2:
        raise ValueError(f"wanda_scores expects a 2-D weight, got shape {tuple(weight.shape)}")
    norm = input_sq_norm.detach().reshape(-1)
    if norm.numel() != weight.shape[1]:
        raise ValueError(
            f"input_sq_norm has {norm.numel()} entries but the weight has {weight.shape[1]} inputs"
        )
    col = torch.sqrt(norm.to(device=weight.device, dtype=torch.float32).clamp_min(0.0))
    return weight.detach().float().abs() * col.unsqueeze(0)
