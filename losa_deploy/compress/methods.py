"""The method interface: every compress method takes `MethodInputs` and returns a `MethodResult`.

`oneshot` (magnitude, wanda, sparsegpt), `losa` and `dense-lora` differ in how they reach their masks, not in
what they hand back, so `orchestrate` has one path for all of them (`orchestrate.METHODS` maps the names).
`prune_pass` is the step all three share: rates for a target from the one allocator, then one sequential prune
with those rates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from ..pruning.masks import Pattern
from .prune import PruneResult, PruneSpec, prune_sequential
from .rates import RateAllocator
from .recipe import Recipe


@dataclass
class MethodInputs:
    """What a method works on. `calib_ids` may be None when the recipe reads no calibration data; `work_dir`
    outlives an interrupted run (LoSA keeps its resume state there)."""

    recipe: Recipe
    model: nn.Module
    tokenizer: Any
    calib_ids: Tensor | None
    work_dir: Path
    device: str = "cpu"
    tune_ids: Tensor | None = None  # held-out windows for ATP tuning
    progress: bool = True

    def allocator(self) -> RateAllocator:
        return RateAllocator(self.model, self.recipe, self.calib_ids, device=self.device, tune_ids=self.tune_ids,
                             progress=self.progress)


@dataclass
class MethodResult:
    """Final masks (True = keep, by full weight name) and what the manifest records about how they were made."""

    masks: dict[str, Tensor]
    targets: dict[str, float]
    block_rates: list[float]
    block_nm: list[tuple[int, int] | None]
    realised: dict[str, float] = field(default_factory=dict)
    patterns: dict[str, str] = field(default_factory=dict)  # "unstructured" or "N:M" per weight
    block_ranks: list[int] = field(default_factory=list)
    allocation: dict[str, Any] = field(default_factory=dict)  # the manifest's "allocation"
    timings: dict[str, float] = field(default_factory=dict)  # added to the manifest's "timings"
    warnings: list[str] = field(default_factory=list)
    section: dict[str, Any] | None = None  # the manifest's "losa" section (adapter methods)
    files: dict[str, Path] = field(default_factory=dict)  # name in the output dir -> file written in work_dir


Method = Callable[[MethodInputs], MethodResult]


@dataclass
class PassResult:
    """One `prune_pass`: the prune, the allocation details, and the seconds each part took."""

    prune: PruneResult
    allocation: dict[str, Any]
    prune_s: float

    @property
    def allocation_s(self) -> float:
        return float(self.allocation["seconds"])


def prune_pass(inputs: MethodInputs, allocator: RateAllocator, sparsity: float, *, method: str,
               pattern: Pattern, dense_state: dict[str, Tensor] | None = None,
               dense_outputs: dict[int, Tensor] | None = None) -> PassResult:
    """Rates for `sparsity` on the model as it is now, then one block-by-block prune to them (`dense_state`,
    `dense_outputs`: see `prune.prune_sequential`)."""
    recipe = inputs.recipe
    rates, info = allocator.rates(sparsity)
    t0 = time.perf_counter()
    spec = PruneSpec(method, pattern, allocator.n_per_block(rates, sparsity, pattern), tuple(recipe.prune.ignore),
                     recipe.prune.blocksize, recipe.prune.percdamp, dict(recipe.prune.type_offsets))
    res = prune_sequential(inputs.model, inputs.calib_ids, spec, rates, device=inputs.device,
                           offload=recipe.offload, dense_state=dense_state, progress=inputs.progress,
                           dense_outputs=dense_outputs)
    return PassResult(res, info, time.perf_counter() - t0)
