"""The manifest's per-linear and per-block records, built the same way for every method's result.

Each mask is verified against the weight it belongs to here again, independently of the method's own check:
the artefact's contract is that the zeros are exactly the masks, at the target sparsity.
"""

from __future__ import annotations

import resource
from typing import Any

import torch
from torch import nn

from ..data import SELF
from ..model_parts import block_prefix, prunable_linears
from ..selfdata import PROMPT_GENRES, PROMPT_TEMPLATE, PROMPT_TOPICS, PROMPT_VERSION, SAMPLER_VERSION
from .calibration import Calibration
from .methods import MethodResult
from .prune import check_realised
from .recipe import Recipe


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def linear_records(model: nn.Module, recipe: Recipe, result: MethodResult) -> dict[str, dict[str, Any]]:
    """{weight name: target, realised, pattern, block} for every mask, each verified on the model's weight."""
    lins = prunable_linears(model, recipe.prune.ignore)
    out: dict[str, dict[str, Any]] = {}
    for name, mask in result.masks.items():
        if name not in lins:
            raise RuntimeError(f"{recipe.method} returned a mask for {name}, which is not a prunable linear")
        bi, lin = lins[name]
        n, m = result.block_nm[bi] or (0, 0)
        target = float(result.targets[name])
        out[name] = {"target": target, "realised": check_realised(name, lin.weight.data, mask, target, n, m),
                     "pattern": f"{n}:{m}" if m else "unstructured", "block": bi}
    return out


def block_records(model: nn.Module, blocks_name: str, result: MethodResult,
                  linears: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per block: its rate, N:M and rank where it has them, and the realised (weighted) sparsity."""
    records = []
    for i, rate in enumerate(result.block_rates):
        b: dict[str, Any] = {"index": i, "rate": float(rate)}
        if result.block_nm[i]:
            b["n_m"] = f"{result.block_nm[i][0]}:{result.block_nm[i][1]}"
        if result.block_ranks:
            b["rank"] = int(result.block_ranks[i])
        pre = block_prefix(blocks_name, i)
        ws = [(n, d) for n, d in linears.items() if n.startswith(pre)]
        tot = sum(_numel(model, n) for n, _ in ws)
        b["realised"] = sum(d["realised"] * _numel(model, n) for n, d in ws) / tot if tot else 0.0
        records.append(b)
    return records


def sparsity_record(model: nn.Module, recipe: Recipe, linears: dict[str, dict[str, Any]]) -> dict[str, Any]:
    total_pruned = sum(_numel(model, n) for n in linears)
    zeros = sum(d["realised"] * _numel(model, n) for n, d in linears.items())
    all_params = sum(p.numel() for p in model.parameters())
    return {"target": recipe.target_sparsity, "realised_pruned_linears": zeros / total_pruned if total_pruned else 0.0,
            "realised_all_parameters": zeros / all_params, "pruned_linear_parameters": total_pruned}


def calibration_record(model: nn.Module, recipe: Recipe, cal: Calibration, calib_dtype: torch.dtype | None,
                       device: str, cpu_gemm: str) -> dict[str, Any]:
    if cal.ids is None:
        return {"source": None, "note": "magnitude pruning with these rates reads no data; calibration flags unused"}
    c = recipe.calibration
    return {"source": c.calib_data, "nsamples": int(cal.ids.shape[0]), "seqlen": int(cal.ids.shape[1]),
            "seed": c.seed, "tokens": int(cal.ids.numel()), "tuning": cal.tuning or None,
            "forward_dtype": str(calib_dtype or next(model.parameters()).dtype).removeprefix("torch."),
            "cpu_gemm": cpu_gemm if torch.device(device).type == "cpu" else None, **_self_text_record(recipe)}


def _self_text_record(recipe: Recipe) -> dict[str, Any]:
    """How self text was drawn, where any step read it: the sampler's version and the prompted share and prompts."""
    c, a = recipe.calibration, recipe.adapters
    if SELF not in (c.calib_data, a.train_data if recipe.trains_adapters else None):
        return {}
    rec: dict[str, Any] = {"sampler_version": SAMPLER_VERSION, "self_prompted": c.self_prompted}
    if c.self_prompted > 0:
        rec.update(prompt_version=PROMPT_VERSION, prompt=PROMPT_TEMPLATE, genres=list(PROMPT_GENRES),
                   topics=list(PROMPT_TOPICS))
    return {"self_text": rec}


def memory_record(device: str) -> dict[str, float]:
    cuda = torch.device(device).type == "cuda"
    cuda_peak = {"peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}
    return {"peak_rss_mb": peak_rss_mb(), **cuda_peak}


def _numel(model: nn.Module, weight_name: str) -> int:
    return int(model.get_parameter(weight_name).numel())
