"""The `compress` recipe: every setting, typed, parsed and validated once, then recorded in the manifest.

One name per setting: the flag `--rank-start`, the profile key `rank_start` and the field `rank_start` are the
same word, so a message, a profile and the code never disagree. The settings fall into sections (what each block
is pruned to, how the rates are allocated, the calibration data, the adapters of LoSA and dense-lora, the
evaluation), each of which checks its own values; `Recipe.validate` adds the rules that join two sections.
Everything here runs before a model is loaded: a bad flag fails before any work and writes nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..console import err
from ..data import check_data_path
from ..errors import UserError
from ..pruning.masks import Pattern, parse_pattern

METHODS = ("magnitude", "wanda", "sparsegpt", "losa", "dense-lora")
ONESHOT_METHODS = ("magnitude", "wanda", "sparsegpt")
# Methods that fine-tune adapters and take the adapter settings: LoSA itself and the naive baseline it is compared
# with (prune once, train a plain dense LoRA, merge, re-prune; `losa.baseline`).
ADAPTER_METHODS = ("losa", "dense-lora")
ALLOCATIONS = ("uniform", "atp", "owl", "rmi")
# Allocations that need only the model being pruned, so they can be recomputed at every LoSA step.
ADAPTER_ALLOCATIONS = ("rmi", "uniform", "atp")
# distill: KL to the dense model's next-token distribution; squarehead: that KL plus every block's output matched
# to the dense model's (normalised MSE, Kurtic et al. 2023).
OBJECTIVES = ("lm", "distill", "squarehead")
TEACHER_OBJECTIVES = ("distill", "squarehead")  # keep a frozen dense copy
MASK_METHODS = ("wanda", "sparsegpt")
# linear: warmup, then decay over all steps; wsd: warmup, hold the peak, decay during the last step only.
LR_SCHEDULES = ("linear", "wsd")
DTYPES = ("float32", "bfloat16", "float16")
CALIB_DTYPES = ("float32", "bfloat16", "auto")
DEFAULT_SPARSITY = 0.5
UNSTRUCTURED = Pattern("unstructured")

# Profile keys of earlier versions -> today's name (accepted with a one-line deprecation note).
DEPRECATED_KEYS = {
    "dropout": "lora_dropout", "alpha": "lora_alpha", "losa_steps": "steps", "losa_rank_min": "rank_start",
    "losa_rank_max": "rank_end", "losa_rank_cap": "rank_cap", "losa_alpha": "lora_alpha",
    "losa_dropout": "lora_dropout", "losa_lr": "lr", "losa_train_data": "train_data",
    "losa_train_samples": "train_samples", "losa_train_seqlen": "train_seqlen", "losa_objective": "objective",
    "losa_mask_method": "mask_method", "losa_batch_size": "batch_size", "losa_uniform_ranks": "uniform_ranks",
    "losa_lr_schedule": "lr_schedule",
}


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _above(value: float, bound: float, name: str) -> None:
    _need(value > bound, f"{name} must be > {bound} (got {value})")


def _at_least(value: float, bound: float, name: str) -> None:
    _need(value >= bound, f"{name} must be >= {bound} (got {value})")


def _fraction(value: float, name: str) -> None:
    _need(0.0 <= value < 1.0, f"{name} must be in [0, 1) (got {value})")


def _one_of(value: str, choices: tuple[str, ...], label: str) -> None:
    _need(value in choices, f"unknown {label} '{value}': use one of {', '.join(choices)}")


@dataclass
class PruneSettings:
    """What every block is pruned to: the mask structure, the mean sparsity, the weights kept dense."""

    pattern: Pattern = UNSTRUCTURED
    sparsity: float | None = None  # None: the pattern's default (N:M fixes it)
    ignore: list[str] = field(default_factory=list)
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT damping, fraction of mean diag(H)
    # Sparsity offset per linear kind inside every block (e.g. {"k_proj": -0.2}); the block's other linears
    # restore its rate, so block and model sparsity are unchanged (`allocation.linear_rates`).
    type_offsets: dict[str, float] = field(default_factory=dict)

    @property
    def target_sparsity(self) -> float:
        """The model's mean target sparsity: fixed by an N:M pattern, else `sparsity` (default 0.5)."""
        fixed = self.pattern.fixed_sparsity
        if fixed is not None:
            return fixed
        return DEFAULT_SPARSITY if self.sparsity is None else float(self.sparsity)

    def validate(self) -> None:
        s = self.sparsity
        if s is not None:
            _need(isinstance(s, (int, float)) and not math.isnan(s) and 0.0 <= s < 1.0,
                  f"--sparsity must be in [0, 1) (got {s})")
        p = self.pattern
        if p.kind == "nm" and s is not None:
            _need(abs(s - (1 - p.n / p.m)) <= 1e-9,
                  f"pattern {p} means {1 - p.n / p.m:.4g} sparsity, not {s}; drop --sparsity or use mixed:{p.m}")
        _need(0 < self.percdamp < 1, f"percdamp must be in (0, 1) (got {self.percdamp})")
        for kind, off in self.type_offsets.items():
            _need(bool(kind) and "." not in kind and "=" not in kind,
                  f"--type-offset needs a linear kind such as k_proj (got '{kind}')")
            _need(isinstance(off, (int, float)) and not math.isnan(off) and -1.0 < off < 1.0,
                  f"--type-offset {kind}: the offset must be in (-1, 1) (got {off})")
        _need(not self.type_offsets or p.kind == "unstructured",
              f"--type-offset applies to unstructured sparsity; pattern {p} fixes every linear's N:M")
        _at_least(self.blocksize, 1, "blocksize")


@dataclass
class AllocationSettings:
    """How the mean target is spread over the blocks (one rate per block)."""

    allocation: str = "uniform"
    atp_beta: float | str | None = None  # a number, "auto", or None (= auto when allocation is atp)
    atp_grid: int = 6
    tune_data: str | None = None  # ATP auto tuning text; default: held-out windows of the calibration source
    tune_samples: int = 8
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    rmi_beta: float = 1.0

    @property
    def tunes_atp(self) -> bool:
        """ATP whose beta is searched on held-out text (no number given)."""
        return self.allocation == "atp" and not isinstance(self.atp_beta, float)

    def validate(self) -> None:
        _one_of(self.allocation, ALLOCATIONS, "allocation")
        check_data_path(self.tune_data, "--tune-data")
        self.atp_beta = _atp_beta(self.atp_beta)
        _need(self.atp_beta is None or self.allocation == "atp",
              f"--atp-beta only applies to --allocation atp (got --allocation {self.allocation})")
        if isinstance(self.atp_beta, float):
            _above(self.atp_beta, 0, "--atp-beta")
        _at_least(self.atp_grid, 2, "atp_grid (the ATP grid's size)")
        _at_least(self.tune_samples, 1, "tune_samples")
        _above(self.owl_m, 0, "--owl-m")
        _fraction(self.owl_lambda, "--owl-lambda")
        _above(self.rmi_beta, 0, "--rmi-beta")


def _atp_beta(value: float | str | None) -> float | str | None:
    """The one place ATP's beta is read: a number (flags and profiles may give text), 'auto', or None."""
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--atp-beta must be a number or 'auto' (got '{value}')") from None


@dataclass
class CalibrationSettings:
    """The calibration windows every data-driven step reads, and the arithmetic of their block forwards."""

    calib_data: str = "self"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    calib_dtype: str = "float32"  # float32 | bfloat16 | auto
    # Share of the self-generated sequences (calibration, training, ATP tuning) that answer a request for a long
    # piece of prose instead of continuing a random token (`selfdata`).
    self_prompted: float = 0.0

    def validate(self) -> None:
        _at_least(self.nsamples, 1, "--nsamples")
        _need(isinstance(self.self_prompted, (int, float)) and 0.0 <= self.self_prompted <= 1.0,
              f"--self-prompted must be in [0, 1] (got {self.self_prompted})")
        _above(self.seqlen, 1, "--seqlen")
        _one_of(self.calib_dtype, CALIB_DTYPES, "--calib-dtype")
        check_data_path(self.calib_data, "--calib-data")


@dataclass
class AdapterSettings:
    """LoSA's steps, ranks and training (dense-lora takes the same settings, one shot at rank `rank_end`)."""

    steps: int = 5
    rank_start: int = 6  # mean rank at the first step
    rank_end: int = 10  # mean rank at the last step
    rank_cap: int = 16  # per-block rank ceiling (adapters are allocated at this rank)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lr: float = 2e-4
    lr_schedule: str = "linear"
    # Step t's share of the training samples is proportional to S_t ** train_share_power (0: equal shares). The
    # first steps prune little and barely need training; the last ones carry the final sparsity.
    train_share_power: float = 0.0
    train_data: str = "self"
    train_samples: int = 256
    train_seqlen: int = 256
    objective: str = "lm"
    mask_method: str = "wanda"
    batch_size: int = 4
    uniform_ranks: bool = False  # ablation: same rank for every block instead of reconstruction-error allocation
    resume: bool = False

    def validate(self, one_shot: bool) -> None:
        """`one_shot`: dense-lora (T = 1, one rank `rank_end`, no per-step data split)."""
        _at_least(self.steps, 1, "--steps")
        _at_least(self.rank_cap, 1, "--rank-cap")
        if one_shot:
            _need(1 <= self.rank_end <= self.rank_cap,
                  f"--rank-end ({self.rank_end}) must lie in [1, --rank-cap {self.rank_cap}]")
        else:
            _need(1 <= self.rank_start <= self.rank_end <= self.rank_cap,
                  f"ranks must satisfy 1 <= --rank-start ({self.rank_start}) <= --rank-end ({self.rank_end}) "
                  f"<= --rank-cap ({self.rank_cap})")
            _need(self.train_samples >= self.steps, f"--train-samples ({self.train_samples}) must be at least "
                  f"--steps ({self.steps}): every step trains on its own slice")
        _one_of(self.lr_schedule, LR_SCHEDULES, "--lr-schedule")
        _need(0.0 <= self.train_share_power <= 8.0,
              f"--train-share-power must lie in [0, 8] (got {self.train_share_power})")
        _one_of(self.objective, OBJECTIVES, "--objective")
        _one_of(self.mask_method, MASK_METHODS, "--mask-method")
        _need(self.train_samples >= 1 and self.train_seqlen > 1 and self.batch_size >= 1,
              "--train-samples, --train-seqlen and --batch-size must be positive")
        _above(self.lr, 0, "--lr")
        _fraction(self.lora_dropout, "--lora-dropout")
        _above(self.lora_alpha, 0, "--lora-alpha")
        check_data_path(self.train_data, "--train-data")


@dataclass
class EvaluationSettings:
    """Perplexity measured before and after (nothing when `eval_data` is None)."""

    eval_data: str | None = None
    eval_seqlen: int = 2048
    eval_max_tokens: int | None = None
    eval_before: bool = True

    def validate(self) -> None:
        _above(self.eval_seqlen, 1, "--eval-seqlen")
        _need(self.eval_max_tokens is None or self.eval_max_tokens >= self.eval_seqlen,
              f"--eval-max-tokens ({self.eval_max_tokens}) must be at least one window "
              f"(--eval-seqlen {self.eval_seqlen})")
        check_data_path(self.eval_data, "--eval-data")


_SECTIONS = {"prune": PruneSettings, "rates": AllocationSettings, "calibration": CalibrationSettings,
             "adapters": AdapterSettings, "evaluation": EvaluationSettings}


@dataclass
class Recipe:
    """Every `compress` setting: where and what (top level) plus one section per stage."""

    out: str = ""
    model: str = "smollm2-135m"
    method: str = "wanda"
    device: str = "cpu"
    dtype: str = "float32"
    offload: bool = False
    overwrite: bool = False
    prune: PruneSettings = field(default_factory=PruneSettings)
    rates: AllocationSettings = field(default_factory=AllocationSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    adapters: AdapterSettings = field(default_factory=AdapterSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    # ---- building -------------------------------------------------------------------------------------
    @classmethod
    def of(cls, **settings: Any) -> "Recipe":
        """`Recipe.of(out=..., sparsity=0.6, steps=2)`: the settings by their one name (see `from_settings`)."""
        return cls.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "Recipe":
        """Build from merged profile + flag settings (keys may use dashes); an unknown key is an error."""
        route = setting_sections()
        top: dict[str, Any] = {}
        parts: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for raw, value in settings.items():
            key = _current_name(raw.replace("-", "_"), raw, route)
            if key == "pattern" and isinstance(value, str):
                value = parse_pattern(value)
            if key == "ignore":
                value = [value] if isinstance(value, str) else list(value or [])
            if key == "type_offsets":
                value = parse_type_offsets(value)
            section = route[key]
            (top if section is None else parts[section])[key] = value
        return cls(**top, **{name: _SECTIONS[name](**kw) for name, kw in parts.items()})

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any] | None, flags: Mapping[str, Any]) -> "Recipe":
        """A profile's `[compress]` section with the given flags (None: not given) over it.

        A profile's ATP beta does not apply once a flag picks another allocation.
        """
        from ..profiles import merge, section

        base = section(profile, "compress")
        settings = merge(base, dict(flags))
        if base.get("type_offsets") and flags.get("type_offsets"):  # a flag changes one kind, keeps the others
            settings["type_offsets"] = {**parse_type_offsets(base["type_offsets"]),
                                        **parse_type_offsets(flags["type_offsets"])}
        if settings.get("allocation") != "atp" and flags.get("atp_beta") is None:
            settings.pop("atp_beta", None)
        return cls.from_settings(settings)

    # ---- derived --------------------------------------------------------------------------------------
    @property
    def target_sparsity(self) -> float:
        return self.prune.target_sparsity

    @property
    def trains_adapters(self) -> bool:
        return self.method in ADAPTER_METHODS

    @property
    def reads_calibration(self) -> bool:
        """Whether any step reads calibration text: magnitude scores ignore data, and uniform or fixed-beta ATP
        rates need none; OWL, RMI and ATP tuning read it, as every other method does."""
        data_free_rates = self.rates.allocation in ("uniform", "atp") and not self.rates.tunes_atp
        return not (self.method == "magnitude" and data_free_rates)

    def to_dict(self) -> dict[str, Any]:
        """Every setting under its one name, flat (the manifest's "recipe"); the pattern as its text."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _SECTIONS}
        for name in _SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        flat["pattern"] = str(self.prune.pattern)
        return flat

    # ---- checks ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Every check that needs no model, each rule once. One-line UserError for each mistake."""
        _need(bool(self.out), "--out DIR is required")
        _one_of(self.method, METHODS, "method")
        _one_of(self.dtype, DTYPES, "--dtype")
        self.prune.validate()
        self.rates.validate()
        self.calibration.validate()
        self.evaluation.validate()
        p, alloc = self.prune.pattern, self.rates.allocation
        _need(p.kind != "nm" or alloc == "uniform", f"a fixed {p} pattern has one rate for every block; "
              f"use --pattern mixed:{p.m} for --allocation {alloc}")
        # dense-lora trains like LoSA but keeps no state; one-shot methods ignore --resume (nothing to resume)
        _need(not (self.adapters.resume and self.method == "dense-lora"),
              "--resume applies to --method losa only: a dense-lora run is one shot, start it again")
        if self.trains_adapters:
            self.adapters.validate(one_shot=self.method == "dense-lora")
            _need(alloc in ADAPTER_ALLOCATIONS,
                  f"--method {self.method} allocates with rmi, atp or uniform, not '{alloc}'")
            _need(not self.rates.tunes_atp, f"--method {self.method} --allocation atp needs a numeric --atp-beta "
                  "(tune one with 'compress --method wanda --allocation atp --atp-beta auto' and reuse its "
                  "manifest's beta)")
        _check_out(Path(self.out).expanduser(), self.overwrite)


def parse_type_offsets(value: Any) -> dict[str, float]:
    """{kind: offset} from a mapping (a profile's inline table) or "kind=offset" strings (repeated flags)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = []
        for text in [value] if isinstance(value, str) else list(value):
            kind, sep, num = str(text).partition("=")
            _need(bool(sep), f"--type-offset takes KIND=OFFSET, e.g. k_proj=-0.2 (got '{text}')")
            items.append((kind.strip(), num.strip()))
    out: dict[str, float] = {}
    for kind, num in items:
        try:
            out[str(kind)] = float(num)
        except (TypeError, ValueError):
            raise UserError(f"--type-offset {kind}: '{num}' is not a number") from None
    return out


def setting_sections() -> dict[str, str | None]:
    """Each setting's name -> the section that holds it (None: the recipe's top level)."""
    route: dict[str, str | None] = {f.name: None for f in dataclasses.fields(Recipe) if f.name not in _SECTIONS}
    for name, cls in _SECTIONS.items():
        route.update({f.name: name for f in dataclasses.fields(cls)})
    return route


def _current_name(key: str, raw: str, route: Mapping[str, Any]) -> str:
    """Today's name of a setting; an old one is accepted with a note, an unknown one is refused with a hint."""
    if key in route:
        return key
    if key in DEPRECATED_KEYS:
        new = DEPRECATED_KEYS[key]
        err.print(f"[yellow]warning:[/yellow] compress setting '{raw}' is deprecated; use '{new}'", highlight=False)
        return new
    known = sorted(route)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"unknown compress setting '{raw}' (in the profile or flags); {hint}known: {', '.join(known)}")


def _check_out(out: Path, overwrite: bool) -> None:
    _need(not out.exists() or overwrite, f"output '{out}' already exists; pass --overwrite or choose another --out")
    _need(not out.exists() or out.is_dir(), f"output '{out}' exists and is not a directory")
