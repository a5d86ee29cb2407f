"""`compress` orchestration: check, load, calibrate, measure, run the method, verify, measure, save.

One path for every method: the method is chosen by name (`METHODS`) and returns a `MethodResult`;
everything around it is the same. Everything that can be wrong with the user's request is checked before the
first expensive step, and the output is written inside `atomic_dir`, so a failed or interrupted run leaves
nothing that looks like a result.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import artifact, models  # as modules: tests substitute their functions
from ..atomic import atomic_dir
from ..console import err
from ..cpu_gemm import cpu_gemm
from ..data import eval_text
from ..errors import UserError
from ..evaluation.perplexity import perplexity, tokenize_eval_text
from ..manifest import build_manifest
from ..model_parts import find_blocks
from .calibration import calibration_for, resolve_calib_dtype
from .checks import check_against_model, check_room
from .losa.baseline import run_dense_lora
from .losa.run import run_losa
from .methods import Method, MethodInputs, MethodResult
from .oneshot import run_oneshot
from .recipe import Recipe
from .report import block_records, calibration_record, linear_records, memory_record, sparsity_record
from .sequential import block_compute

# The one per-method choice: each takes `MethodInputs` and returns a `MethodResult`.
METHODS: dict[str, Method] = {"magnitude": run_oneshot, "wanda": run_oneshot, "sparsegpt": run_oneshot,
                              "losa": run_losa, "dense-lora": run_dense_lora}


def run_compress(recipe: Recipe, *, progress: bool = True, command: str | None = None,
                 profile: str | None = None) -> dict[str, Any]:
    """Do the whole `compress` and return the manifest written to `recipe.out`."""
    recipe.validate()
    with cpu_gemm() as gemm:
        return _Compress(recipe, progress, gemm).run(command, profile)


@dataclass
class _Compress:
    """One compress run: the loaded model and what each stage adds for the manifest."""

    recipe: Recipe
    progress: bool
    cpu_gemm: str
    timings: dict[str, float] = field(default_factory=dict)
    evals: dict[str, Any] = field(default_factory=dict)

    def run(self, command: str | None, profile: str | None) -> dict[str, Any]:
        t_all = time.perf_counter()
        recipe = self.recipe
        self.out = Path(recipe.out).expanduser()
        self.device = models.resolve_device(recipe.device)
        calib_dtype = resolve_calib_dtype(recipe.calibration.calib_dtype, self.device)
        artifact.remove_stale_partials(self.out)
        check_room(recipe, self.out)
        self._load()
        check_against_model(self.model, recipe, self.device)
        eval_ids = self._eval_ids()
        cal = calibration_for(self.model, self.tok, recipe)
        self.timings["calibration_data_s"] = cal.seconds
        self._evaluate(eval_ids, "before")
        inputs = MethodInputs(recipe, self.model, self.tok, cal.ids, artifact.work_dir(self.out), self.device,
                              cal.tune_ids, self.progress)
        with block_compute(calib_dtype):
            result = METHODS[recipe.method](inputs)
        self.timings.update(result.timings)
        linears = linear_records(self.model, recipe, result)
        blocks_name, _ = find_blocks(self.model)
        blocks = block_records(self.model, blocks_name, result, linears)
        self._evaluate(eval_ids, "after")
        self.timings["total_s"] = time.perf_counter() - t_all
        manifest = build_manifest(
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command, profile=profile,
            recipe=recipe.to_dict() | {"target_sparsity": recipe.target_sparsity},
            model={"source": recipe.model, "architecture": type(self.model).__name__, "blocks": len(blocks),
                   "blocks_path": blocks_name, "parameters": sum(p.numel() for p in self.model.parameters())},
            sparsity=sparsity_record(self.model, recipe, linears), allocation=result.allocation, blocks=blocks,
            linears=linears,
            calibration=calibration_record(self.model, recipe, cal, calib_dtype, self.device, self.cpu_gemm),
            timings=self.timings, memory=memory_record(self.device), eval=self.evals or None,
            warnings=result.warnings, **({"losa": result.section} if result.section is not None else {}),
        )
        self._save(result, manifest)
        return manifest

    def _load(self) -> None:
        t0 = time.perf_counter()
        r = self.recipe
        self.model, self.tok = models.load_model(r.model, dtype=r.dtype, device="cpu" if r.offload else self.device)
        self.timings["load_s"] = time.perf_counter() - t0

    def _eval_ids(self) -> torch.Tensor | None:
        """The perplexity text's tokens, checked to hold one window before any work (None: no evaluation)."""
        ev = self.recipe.evaluation
        if not ev.eval_data:
            return None
        ids = tokenize_eval_text(self.tok, eval_text(ev.eval_data))
        usable = ids.numel() if ev.eval_max_tokens is None else min(ids.numel(), ev.eval_max_tokens)
        if usable < ev.eval_seqlen:
            raise UserError(f"--eval-data has {usable} usable tokens, fewer than one window of --eval-seqlen "
                            f"{ev.eval_seqlen}")
        self.evals = {"data": ev.eval_data, "seqlen": ev.eval_seqlen, "max_tokens": ev.eval_max_tokens}
        return ids

    def _evaluate(self, eval_ids: torch.Tensor | None, when: str) -> None:
        """Perplexity `before` (dense, unless --no-eval-before) or `after` (compressed) into the manifest."""
        ev = self.recipe.evaluation
        if eval_ids is None or (when == "before" and not ev.eval_before):
            return
        t = time.perf_counter()
        if self.recipe.offload:
            self.model.to(self.device)
        r = perplexity(self.model, eval_ids, ev.eval_seqlen, max_tokens=ev.eval_max_tokens, progress=self.progress)
        if self.recipe.offload:
            self.model.to("cpu")
        self.evals[when] = r.to_dict() | {"seconds": time.perf_counter() - t}
        self.timings[f"eval_{when}_s"] = self.evals[when]["seconds"]
        if when == "before":
            err.print(f"[dim]perplexity before: {self.evals[when]['perplexity']:.4f}[/dim]", highlight=False)

    def _save(self, result: MethodResult, manifest: dict[str, Any]) -> None:
        """Checkpoint, masks, manifest and the method's files, all at once; then the method's work dir goes."""
        self.model.to("cpu")
        work = artifact.work_dir(self.out)
        with atomic_dir(self.out, overwrite=self.recipe.overwrite) as tmp:
            artifact.save_checkpoint(tmp, self.model, self.tok, result.masks)
            artifact.write_manifest(tmp, manifest)
            for fname in (result.section or {}).get("files", []):  # e.g. losa_schedule.png, written into work
                src = work / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
        if self.recipe.trains_adapters:  # another method's resume state in the same place is not ours to remove
            shutil.rmtree(work, ignore_errors=True)


def command_line() -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in ["losa-deploy", *sys.argv[1:]])
