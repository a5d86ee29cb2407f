"""What LoSA and its dense-lora baseline both need before training: data, frozen model, teacher, autocast.

Both methods fine-tune adapters on the same budget with the same optimiser, so they must prepare identically:
one function here instead of two copies that could drift apart.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ... import data  # as a module: tests substitute its sampler
from ...model_parts import prunable_linears
from ...models import pad_token_id
from ...precision import bf16_autocast_supported
from ..methods import MethodInputs
from ..recipe import TEACHER_OBJECTIVES
from .adapter import AdapterSet
from .head_loss import head_kernel, head_loss_applies
from .train import TrainSample, build_train_samples


def calibration_or_default(inputs: MethodInputs) -> Tensor:
    """The calibration windows given by `compress`, or drawn here when a caller passes none."""
    if inputs.calib_ids is not None:
        return inputs.calib_ids
    c = inputs.recipe.calibration
    return data.calibration_ids(inputs.tokenizer, c.calib_data, c.nsamples, c.seqlen, c.seed, model=inputs.model,
                                self_prompted=c.self_prompted)


@dataclass
class TrainingSetup:
    """The model frozen for adapter training, its dense weights, the training samples and the teacher."""

    samples: list[TrainSample]
    pad_id: int
    linears: dict[str, tuple[int, nn.Linear]]  # prunable linears: full weight name -> (block, module)
    dense_state: dict[str, Tensor]  # their dense weights (CPU), for reconstruction errors
    teacher: nn.Module | None  # frozen dense copy for --objective distill
    teacher_dtype: str | None
    use_bf16: bool


def prepare_training(inputs: MethodInputs) -> TrainingSetup:
    """Training data first (it may generate text with the dense model), then freeze, then the teacher copy."""
    recipe, model, tok = inputs.recipe, inputs.model, inputs.tokenizer
    a = recipe.adapters
    samples = build_train_samples(tok, a.train_data, a.train_samples, a.train_seqlen, recipe.calibration.seed,
                                  model=model, self_prompted=recipe.calibration.self_prompted)
    pad_id = pad_token_id(tok)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    lin = prunable_linears(model, recipe.prune.ignore)
    dense_state = {name: layer.weight.detach().to("cpu", copy=True) for name, (_, layer) in lin.items()}
    use_bf16 = bf16_autocast_supported(inputs.device)
    teacher = teacher_dtype = None
    if a.objective in TEACHER_OBJECTIVES:
        # Under bf16 autocast the teacher's fp32 weights would be cast again at every batch; a bf16 copy gives the
        # same logits up to rounding in half the memory.
        teacher = copy.deepcopy(model).eval()
        if use_bf16 and next(teacher.parameters()).dtype == torch.float32:
            teacher.to(torch.bfloat16)
        teacher_dtype = str(next(teacher.parameters()).dtype).replace("torch.", "")
    return TrainingSetup(samples, pad_id, lin, dense_state, teacher, teacher_dtype, use_bf16)


def optimizer_record(lr: float, total_updates: int, schedule: str = "linear", **extra: Any) -> dict[str, Any]:
    """The manifest's description of `train.make_optimizer`'s optimiser and schedule."""
    return {"name": "AdamW", "lr": lr, "weight_decay": 0.0, "warmup": 0.3, "schedule": schedule, **extra,
            "total_steps": total_updates, "max_grad_norm": 1.0}


def training_record(inputs: MethodInputs, setup: TrainingSetup, adapters: AdapterSet,
                    optimizer: dict[str, Any]) -> dict[str, Any]:
    """The manifest keys both adapter methods report about their training (same names as before)."""
    a = inputs.recipe.adapters
    return {
        "objective": a.objective, "mask_method": a.mask_method, "allocation": inputs.recipe.rates.allocation,
        "train_data": a.train_data, "train_samples": len(setup.samples), "train_seqlen": a.train_seqlen,
        "batch_size": a.batch_size, "optimizer": optimizer,
        "alpha": a.lora_alpha, "dropout": a.lora_dropout, "adapter_form": adapters.form,
        "autocast": "bfloat16" if setup.use_bf16 else None, "teacher_dtype": setup.teacher_dtype,
        "loss_form": "chunked-head" if head_loss_applies(inputs.model) else "logits",
        "head_kernel": head_kernel() if head_loss_applies(inputs.model) else None,
    }


def mean_sparsity(masks: dict[str, Tensor]) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return 1.0 - kept / max(1, total)
