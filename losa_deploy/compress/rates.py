"""The one layer-wise rate allocator: per-block sparsity for a target, on the model as it is now.

One-shot pruning asks once; every LoSA step asks again on the merged model at that step's target, and dense-lora
asks before its prune and its re-prune. The statistics come from the block walk (`sequential`), the arithmetic
from the pure `allocation` module; this class only joins the two and records what the manifest shows.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..allocation import atp_beta_range, atp_rates, owl_rates, rmi_delta, rmi_importance, rmi_rates, uniform_rates
from ..errors import UserError
from ..model_parts import block_param_counts, find_blocks
from ..pruning.masks import Pattern, mixed_n_per_block
from .recipe import Recipe
from .sequential import collect_block_grams, collect_outlier_ratios


def block_weights(model: nn.Module, ignore: list[str]) -> list[float] | None:
    """Per-block prunable parameter counts when blocks differ in size (None: equal blocks, plain mean)."""
    counts = block_param_counts(model, ignore)
    if any(c == 0 for c in counts):
        raise UserError("--ignore leaves a decoder block with no linear layer to prune; narrow the patterns")
    return None if len(set(counts)) == 1 else [float(c) for c in counts]


def capped_atp_beta(beta: float, num_blocks: int, sparsity: float) -> float:
    """ATP's step at one target: the recipe's beta, capped just below the legal maximum for that target.

    The legal range shrinks with min(S_t, 1-S_t), so an early, low LoSA target may not admit the beta chosen for
    the final S; at the cap (S_t >= 0.5) the last block would be 100% sparse, hence the factor just below 1.
    """
    _, hi = atp_beta_range(num_blocks, sparsity)
    return min(float(beta), hi * (1.0 - 1e-9))


class RateAllocator:
    """Rates for any target with the recipe's allocation (uniform, ATP, OWL or RMI) and block weights.

    `tune_ids`: held-out windows for ATP without a numeric beta (searched once, on the first call).
    """

    def __init__(self, model: nn.Module, recipe: Recipe, calib_ids: torch.Tensor | None, *, device: str,
                 tune_ids: torch.Tensor | None = None, progress: bool = True) -> None:
        self.model, self.recipe, self.calib_ids, self.tune_ids = model, recipe, calib_ids, tune_ids
        self.settings = recipe.rates
        self.device, self.progress = device, progress
        self.num_blocks = len(find_blocks(model)[1])
        self.weights = block_weights(model, recipe.prune.ignore)
        self.beta = self.settings.atp_beta if isinstance(self.settings.atp_beta, float) else None
        self.tuning: dict[str, Any] | None = None

    def rates(self, sparsity: float) -> tuple[list[float], dict[str, Any]]:
        """(one rate per block with weighted mean `sparsity`, the details the manifest records)."""
        t0 = time.perf_counter()
        name = self.settings.allocation
        info: dict[str, Any] = {"method": name}
        if name == "atp":
            rates = self._atp(sparsity, info)
        elif name == "owl":
            rates = self._owl(sparsity, info)
        elif name == "rmi":
            rates = self._rmi(sparsity, info)
        else:
            rates = uniform_rates(self.num_blocks, sparsity, self.weights)
        info["seconds"] = time.perf_counter() - t0
        return [float(r) for r in rates], info

    def n_per_block(self, rates: list[float], sparsity: float, pattern: Pattern) -> list[int] | None:
        """Per-block kept N for a mixed:M pattern (None for the others)."""
        if pattern.kind != "mixed":
            return None
        return mixed_n_per_block(rates, pattern.m, sparsity, self.weights)

    def atp_beta_at(self, sparsity: float) -> float:
        if self.beta is None:
            raise RuntimeError("ATP beta not known yet: ask for rates first")
        return capped_atp_beta(self.beta, self.num_blocks, sparsity)

    def _atp(self, sparsity: float, info: dict[str, Any]) -> list[float]:
        if self.beta is None:
            from .atp_tuning import tune_atp_beta

            if self.tune_ids is None:
                raise RuntimeError("ATP tuning needs held-out tuning windows")
            self.beta, self.tuning = tune_atp_beta(self.model, self.calib_ids, self.tune_ids, self.recipe,
                                                   self.weights, self.device, self.progress)
            info["tuning"] = self.tuning
        info["beta"] = self.beta
        return atp_rates(self.num_blocks, sparsity, self.atp_beta_at(sparsity), self.weights)

    def _owl(self, sparsity: float, info: dict[str, Any]) -> list[float]:
        s = self.settings
        ratios = collect_outlier_ratios(self.model, self.calib_ids, s.owl_m, ignore=self.recipe.prune.ignore,
                                        device=self.device, offload=self.recipe.offload, progress=self.progress)
        info.update({"m": s.owl_m, "lambda": s.owl_lambda, "outlier_ratios": ratios})
        return owl_rates(ratios, sparsity, s.owl_lambda, self.weights)

    def _rmi(self, sparsity: float, info: dict[str, Any]) -> list[float]:
        beta = self.settings.rmi_beta
        grams = collect_block_grams(self.model, self.calib_ids, device=self.device, offload=self.recipe.offload,
                                    progress=self.progress)
        _, redundancy, importance = rmi_importance(grams, beta)
        info.update({"beta": beta, "delta": rmi_delta(sparsity), "redundancy": list(redundancy),
                     "importance": list(importance)})
        return rmi_rates(grams, sparsity, beta, None, self.weights)
