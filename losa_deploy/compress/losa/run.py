"""The LoSA loop (METHODS §4): T steps of merge -> rates -> prune -> un-merge -> ranks -> fine-tune.

Everything model-facing goes through the shared pieces (`methods.prune_pass`: the one rate allocator and the
sequential prune) and the pure math; this module only adds the adapter bookkeeping, the schedules, training and
checkpoints. Sparsity is exact at every step: masks are explicit, the adapter update is masked, and the zero
pattern is checked after every step and after the final merge.

Fixed N:M and mixed:M patterns: the intermediate steps (S_t < S) prune unstructured at S_t, the last step applies
the N:M pattern (mixed: per-block N from that step's rates), because an N:M pattern has no intermediate
sparsities to schedule through.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..methods import MethodInputs, MethodResult, PassResult, prune_pass
from ..prune import PruneResult
from ..recipe import UNSTRUCTURED
from .adapter import AdapterSet, attach_adapters, check_zero_pattern, merge_into, set_rank, unmerge_from
from .ranks import allocate_ranks, uniform_ranks
from .schedule import rank_schedule, sparsity_schedule
from .setup import (TrainingSetup, calibration_or_default, mean_sparsity, optimizer_record, prepare_training,
                    training_record)
from .state import STATE_FILE, load_state, recipe_fingerprint, rng_state, save_state, set_rng_state
from .train import batches, make_optimizer, num_batches, reset_inactive_state, split_slices, train_slice

PLOT_FILE = "losa_schedule.png"
StepHook = Callable[[int], None]


def run_losa(inputs: MethodInputs, on_step_end: StepHook | None = None) -> MethodResult:
    """Run LoSA on `inputs.model` in place; on return its prunable linears hold the merged sparse weights.

    `inputs.work_dir` holds `losa_state.pt`, rewritten after every step, and `losa_schedule.png`. With the
    recipe's `resume` a run continues after the last complete step; the result equals an uninterrupted run's.
    An interrupt leaves the state and says how to resume.
    """
    run = _LosaRun(inputs)
    try:
        run.steps(on_step_end)
    except KeyboardInterrupt as e:  # the work state stays for --resume; say so in the one-line message
        if (run.work_dir / STATE_FILE).is_file():
            hint = f"LoSA state of the last finished step kept in {run.work_dir}; rerun with --resume"
            e.hint = hint  # type: ignore[attr-defined]
        raise
    return run.finish()


class _LosaRun:
    """One LoSA run: the state that lives across steps, and one method per part of a step."""

    def __init__(self, inputs: MethodInputs) -> None:
        self.t_all = time.perf_counter()
        recipe = inputs.recipe
        self.inputs, self.a = inputs, recipe.adapters
        self.work_dir = Path(inputs.work_dir)
        self.T, self.S = int(self.a.steps), float(recipe.target_sparsity)
        self.targets = sparsity_schedule(self.S, self.T)
        self.omegas = rank_schedule(self.a.rank_start, self.a.rank_end, self.T)
        inputs.calib_ids = calibration_or_default(inputs)
        self.fingerprint = recipe_fingerprint(recipe.to_dict(), inputs.calib_ids)
        # A resume from another recipe is refused before any expensive work (data generation, pruning).
        resume_state = load_state(self.work_dir, self.fingerprint) if self.a.resume else None
        self.setup: TrainingSetup = prepare_training(inputs)
        shares = [s_t ** float(self.a.train_share_power) for s_t in self.targets]
        self.slices = split_slices(len(self.setup.samples), self.T, shares)
        self.total_updates = sum(num_batches(e - s, self.a.batch_size) for s, e in self.slices)
        # wsd: the peak lr holds until the last step, which then decays to 0 (the final sparsity gets full-size
        # updates)
        last_slice = self.slices[-1][1] - self.slices[-1][0]
        self.decay_from = (self.total_updates - num_batches(last_slice, self.a.batch_size)
                           if self.a.lr_schedule == "wsd" else None)
        self.dense_outputs: dict[int, Tensor] = {}  # the dense reference on calib_ids, the same at every step
        self.allocator = inputs.allocator()
        self.adapters: AdapterSet = attach_adapters(self.setup.linears, self.a.rank_cap, self.a.lora_alpha,
                                                    self.a.lora_dropout, seed=recipe.calibration.seed)
        self.params = list(self.adapters.parameters())
        self.opt, self.sched = make_optimizer(self.params, self.a.lr, self.total_updates, decay_from=self.decay_from)
        self.history: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.start, self.resumed_from = 1, None
        self.last_prune: PruneResult | None = None
        if resume_state is not None:
            self._restore(resume_state)

    def _restore(self, st: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, w in st["weights"].items():
                self.adapters.linears[name].weight.copy_(w)
        self.adapters.load_state_dict(st["adapters"], st["ranks"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.history, self.losses = st["history"], st["losses"]
        self.start = int(st["step"]) + 1
        self.resumed_from = int(st["step"])
        set_rng_state(st["rng"])

    # ---- the loop -------------------------------------------------------------------------------------
    def steps(self, on_step_end: StepHook | None) -> None:
        try:
            for t in range(self.start, self.T + 1):
                self._step(t)
                if on_step_end is not None:
                    on_step_end(t)
        finally:
            self.adapters.remove()  # never leave hooks on the caller's model

    def _step(self, t: int) -> None:
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        self._merge()  # (1) merge the masked adapter; adapters off while the plain model is pruned
        timing["merge_s"] = time.perf_counter() - t0
        done = self._prune(t)  # (2) rates for S_t on the merged model, (3) prune (masks may regrow)
        res = done.prune
        timing["rmi_s"], timing["prune_s"] = done.allocation_s, done.prune_s
        t0 = time.perf_counter()
        regrown = self._unmerge(res.masks)  # (4) W_base = W_pruned - delta ⊙ M_new
        ranks = self._set_ranks(res.recon_error, self.omegas[t - 1])  # (5) ranks from reconstruction errors
        timing["merge_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        step_losses = self._train(t)  # (6) fine-tune the adapters on this step's own slice
        timing["train_s"] = time.perf_counter() - t0
        self.history.append(self._step_record(t, res, ranks, regrown, step_losses, timing))
        self._save(t)

    def _merge(self) -> None:
        for name, a in self.adapters.adapters.items():
            merge_into(self.adapters.linears[name].weight, a)
        self.adapters.set_enabled(False)

    def _prune(self, t: int) -> PassResult:
        """Intermediate steps prune unstructured at S_t; the last step applies the recipe's pattern."""
        pattern = self.inputs.recipe.prune.pattern if t == self.T else UNSTRUCTURED
        done = prune_pass(self.inputs, self.allocator, self.targets[t - 1], method=self.a.mask_method,
                          pattern=pattern, dense_state=self.setup.dense_state, dense_outputs=self.dense_outputs)
        self.last_prune = done.prune
        return done

    def _unmerge(self, masks: dict[str, Tensor]) -> int:
        """Adopt the new masks and un-merge against them; returns how many weights regrew."""
        regrown = 0
        for name, a in self.adapters.adapters.items():
            new_mask = masks[name].to(a.mask.device)
            regrown += int((new_mask & ~a.mask).sum())
            a.mask.copy_(new_mask)
            unmerge_from(self.adapters.linears[name].weight, a)
            check_zero_pattern(self.adapters.linears[name].weight, a.mask, name)
        return regrown

    def _set_ranks(self, recon: list[float], omega: float) -> list[int]:
        """A rank change re-bases W so the function is unchanged; adapters back on afterwards."""
        L, r_max = self.allocator.num_blocks, int(self.a.rank_cap)
        ranks = uniform_ranks(L, omega, r_max) if self.a.uniform_ranks else allocate_ranks(recon, omega, r_max)
        for name, a in self.adapters.adapters.items():
            set_rank(self.adapters.linears[name].weight, a, ranks[self.adapters.block_of[name]])
            reset_inactive_state(self.opt, a.A, a.B, a.rank)
        self.adapters.set_enabled(True)
        return ranks

    def _train(self, t: int) -> list[float]:
        s0, s1 = self.slices[t - 1]
        su, a = self.setup, self.a
        with self.adapters.training(torch.bfloat16 if su.use_bf16 else None):
            step_losses = train_slice(
                self.inputs.model, self.params, batches(su.samples[s0:s1], a.batch_size, su.pad_id), self.opt,
                self.sched, objective=a.objective, teacher=su.teacher, device=self.inputs.device,
                autocast=su.use_bf16, desc=f"LoSA step {t}/{self.T} training", progress=self.inputs.progress,
            )
        self.losses.extend(step_losses)
        return step_losses

    def _step_record(self, t: int, res: PruneResult, ranks: list[int], regrown: int, step_losses: list[float],
                     timing: dict[str, float]) -> dict[str, Any]:
        return {
            "step": t, "sparsity_target": self.targets[t - 1], "omega": self.omegas[t - 1],
            "block_rates": [float(r) for r in res.block_rates],
            "block_nm": [list(x) if x else None for x in res.block_nm],
            "block_ranks": ranks, "recon_error": [float(e) for e in res.recon_error],
            "realised_sparsity": mean_sparsity(res.masks), "regrown_weights": regrown,
            "kept_weights_exactly_zero": _merged_zero_check(self.adapters),
            "train_samples": list(self.slices[t - 1]), "optimizer_steps": len(step_losses),
            "train_loss_mean": (sum(step_losses) / len(step_losses)) if step_losses else None,
            "timings": timing, "prune_timings": res.timings, "warnings": res.warnings,
        }

    def _save(self, t: int) -> None:
        ad = self.adapters
        save_state(self.work_dir, {
            "fingerprint": self.fingerprint, "step": t,
            "weights": {n: layer.weight.detach().cpu().clone() for n, layer in ad.linears.items()},
            "adapters": ad.state_dict(), "ranks": ad.ranks(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": rng_state(),
            "history": self.history, "losses": self.losses,
            "masks": {n: a.mask.cpu().clone() for n, a in ad.adapters.items()},
        })

    # ---- the end --------------------------------------------------------------------------------------
    def finish(self) -> MethodResult:
        """Final merge W + (alpha/r)(B A) ⊙ M, verified exactly zero off the mask; then the result."""
        t0 = time.perf_counter()
        masks: dict[str, Tensor] = {}
        kept_zero = 0
        for name, a in self.adapters.adapters.items():
            w = self.adapters.linears[name].weight
            merge_into(w, a)
            kept_zero += check_zero_pattern(w, a.mask, name)
            masks[name] = a.mask.detach().cpu().clone()
        merge_final_s = time.perf_counter() - t0
        last = self.history[-1]
        rates, ranks = [float(r) for r in last["block_rates"]], [int(r) for r in last["block_ranks"]]
        if self.last_prune is not None:
            targets, block_nm = dict(self.last_prune.targets), list(self.last_prune.block_nm)
            patterns = dict(self.last_prune.patterns)
        else:  # resumed after the last step: nothing was pruned in this process
            targets = {n: rates[self.adapters.block_of[n]] for n in masks}
            block_nm = [tuple(x) if x else None for x in last["block_nm"]]
            patterns = {n: "unstructured" for n in masks}
        files = self._plot()
        section = self._section(kept_zero, merge_final_s, rates, ranks, files)
        recipe = self.inputs.recipe
        return MethodResult(
            masks=masks, targets=targets, block_rates=rates, block_nm=block_nm,  # type: ignore[arg-type]
            realised={n: 1.0 - float(m.float().mean()) for n, m in masks.items()}, patterns=patterns,
            block_ranks=ranks,
            allocation={"method": f"{recipe.rates.allocation} (LoSA)"},
            timings={"losa_s": section["timings"]["total_s"]}, section=section, files=files)

    def _plot(self) -> dict[str, Path]:
        recipe = self.inputs.recipe
        title = f"LoSA {self.a.mask_method}+{recipe.rates.allocation}, S={self.S:g}, T={self.T}"
        try:
            from .plot import plot_schedule

            return {PLOT_FILE: plot_schedule(self.history, self.work_dir / PLOT_FILE, title=title)}
        except Exception as e:  # a missing plot must not lose a finished compression
            from ...console import err

            err.print(f"[yellow]warning:[/yellow] LoSA schedule plot not written: {type(e).__name__}: {e}",
                      highlight=False)
            return {}

    def _section(self, kept_zero: int, merge_final_s: float, rates: list[float], ranks: list[int],
                 files: dict[str, Path]) -> dict[str, Any]:
        """The manifest's "losa" section."""
        recipe = self.inputs.recipe
        totals = {k: sum(h["timings"].get(k, 0.0) for h in self.history)
                  for k in ("rmi_s", "prune_s", "train_s", "merge_s")}
        totals["merge_s"] += merge_final_s
        beta = recipe.rates.atp_beta
        atp = ({"recipe": beta, "per_step": [self.allocator.atp_beta_at(x) for x in self.targets]}
               if recipe.rates.allocation == "atp" else None)
        return {
            "steps": self.history,
            "schedule": {"sparsity": self.targets, "omega": self.omegas, "rank_cap": int(self.a.rank_cap)},
            **training_record(self.inputs, self.setup, self.adapters,
                              optimizer_record(self.a.lr, self.total_updates, self.a.lr_schedule,
                                               decay_from=self.decay_from)),
            "atp_beta": atp,
            "rank_allocation": "uniform" if self.a.uniform_ranks else "reconstruction-error",
            "loss_curve": self.losses, "final_ranks": ranks,
            "kept_weights_exactly_zero": kept_zero, "resumed_from_step": self.resumed_from,
            "timings": {**totals, "total_s": time.perf_counter() - self.t_all},
            "zero_pattern_verified": True,
            "rates": rates, "ranks": ranks,
            "files": sorted(files),
        }


def _merged_zero_check(adapters: AdapterSet) -> int:
    """Verify (W_base + delta ⊙ M) has exact zeros off the mask for every linear, without touching W."""
    kept_zero = 0
    with torch.no_grad():
        for name, a in adapters.adapters.items():
            w = adapters.linears[name].weight
            merged = (w.float() + a.delta().detach()).to(w.dtype)
            kept_zero += check_zero_pattern(merged, a.mask, name)
    return kept_zero
