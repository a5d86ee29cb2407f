"""Calibration windows for the recipe, held-out tuning windows for ATP, and the calibration forwards' dtype."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..console import err
from .. import data  # as a module: tests substitute its sampler
from ..data import SELF, eval_text
from ..errors import UserError
from ..precision import bf16_autocast_supported
from .losa.train import self_train_seed
from .recipe import Recipe

_TUNE_SEED_OFFSET = 1_000_003


@dataclass
class Calibration:
    """The windows every data-driven step reads (None: nothing reads data) and how they were drawn."""

    ids: torch.Tensor | None = None
    tune_ids: torch.Tensor | None = None
    tuning: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def calibration_for(model: Any, tok: Any, recipe: Recipe) -> Calibration:
    """The recipe's calibration windows, plus ATP tuning windows when its beta is to be searched."""
    if not recipe.reads_calibration:
        return Calibration()
    t0 = time.perf_counter()
    n_tune = recipe.rates.tune_samples if recipe.rates.tunes_atp else 0
    c = recipe.calibration
    if n_tune and recipe.rates.tune_data is None and c.calib_data != SELF:
        calib, tune_ids, tuning = _held_out_draws(model, tok, recipe, n_tune)
    else:
        calib = calibration_windows(model, tok, recipe)
        tune_ids, tuning = _tuning_windows(model, tok, recipe, n_tune) if n_tune else (None, {})
    return Calibration(calib, tune_ids, tuning, time.perf_counter() - t0)


def shares_self_text(recipe: Recipe) -> bool:
    """Whether the calibration windows can be the first adapter-training sequences (both self text, same length).

    Generating text is as slow per token as training on it, so the calibration then costs no generation at all.
    """
    c, a = recipe.calibration, recipe.adapters
    return (recipe.trains_adapters and c.calib_data == SELF and a.train_data == SELF and c.seqlen == a.train_seqlen
            and c.nsamples <= a.train_samples)


def calibration_windows(model: Any, tok: Any, recipe: Recipe) -> torch.Tensor:
    """The calibration windows; for LoSA on self text, the first training sequences (no second generation)."""
    c = recipe.calibration
    if shares_self_text(recipe):
        ids = data.calibration_ids(tok, SELF, recipe.adapters.train_samples, c.seqlen, self_train_seed(c.seed),
                                   model=model, self_prompted=c.self_prompted)
        return ids[: c.nsamples]
    return data.calibration_ids(tok, c.calib_data, c.nsamples, c.seqlen, c.seed, model=model,
                                self_prompted=c.self_prompted)


def _held_out_draws(model: Any, tok: Any, recipe: Recipe, n_tune: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """For a text source the tuning windows are the next `n_tune` draws of the same seeded sampler: it takes one
    new document per window, so they come from documents the calibration did not use (when there are enough)."""
    c = recipe.calibration
    ids = data.calibration_ids(tok, c.calib_data, c.nsamples + n_tune, c.seqlen, c.seed, model=model)
    calib, tune_ids = ids[: c.nsamples], ids[c.nsamples :]
    calib_rows = {tuple(r.tolist()) for r in calib}
    overlap = sum(tuple(r.tolist()) in calib_rows for r in tune_ids)
    info = {"source": c.calib_data, "windows": n_tune, "seqlen": c.seqlen,
            "how": f"draws {c.nsamples}..{c.nsamples + n_tune - 1} of the calibration sampler",
            "identical_to_calibration": overlap}
    return calib, tune_ids, info


def _tuning_windows(model: Any, tok: Any, recipe: Recipe, n_tune: int) -> tuple[torch.Tensor, dict]:
    """`--tune-data` (its first windows), else for `self` calibration text generated with another seed."""
    c, tune_data = recipe.calibration, recipe.rates.tune_data
    if tune_data is not None:
        ids = tok(eval_text(tune_data), return_tensors="pt").input_ids[0]
        usable = ids.numel() // c.seqlen
        if usable < 1:
            raise UserError(f"--tune-data has {ids.numel()} tokens, fewer than one window of --seqlen {c.seqlen}")
        k = min(n_tune, usable)
        info = {"source": tune_data, "windows": k, "seqlen": c.seqlen, "how": "first windows"}
        return ids[: k * c.seqlen].view(k, c.seqlen), info
    seed = c.seed + _TUNE_SEED_OFFSET
    ids = data.calibration_ids(tok, SELF, n_tune, c.seqlen, seed, model=model, self_prompted=c.self_prompted)
    return ids, {"source": "self", "windows": n_tune, "seqlen": c.seqlen, "how": f"generated with seed {seed}"}


def resolve_calib_dtype(name: str, device: str) -> torch.dtype | None:
    """The autocast dtype of the calibration block forwards (None: the model's own, float32 by default)."""
    if name == "float32":
        return None
    native = bf16_autocast_supported(device)
    if name == "auto":
        return torch.bfloat16 if native else None
    if not native:
        err.print("[yellow]warning:[/yellow] --calib-dtype bfloat16 on hardware without native bf16: emulated, "
                  "slower than float32", highlight=False)
    return torch.bfloat16
