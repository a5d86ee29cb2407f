"""One-shot pruning (`--method magnitude | wanda | sparsegpt`): allocate rates once, prune every block once."""

from __future__ import annotations

from .methods import MethodInputs, MethodResult, prune_pass


def run_oneshot(inputs: MethodInputs) -> MethodResult:
    """Prune `inputs.model` in place to the recipe's target with its allocation and pattern."""
    recipe = inputs.recipe
    done = prune_pass(inputs, inputs.allocator(), recipe.target_sparsity, method=recipe.method,
                      pattern=recipe.prune.pattern)
    res, allocation = done.prune, dict(done.allocation)
    if recipe.method == "sparsegpt":
        allocation["sparsegpt_damping_retries"] = {k: v for k, v in res.sparsegpt_info.items()
                                                   if v.get("damping_retries")}
    timings = {"allocation_s": done.allocation_s, "prune_s": done.prune_s}
    timings.update({f"prune_{k}": v for k, v in res.timings.items()})
    return MethodResult(masks=res.masks, targets=res.targets, block_rates=res.block_rates, block_nm=res.block_nm,
                        realised=res.realised, patterns=res.patterns, allocation=allocation, timings=timings,
                        warnings=list(res.warnings))
