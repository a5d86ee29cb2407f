"""Typed settings for `compress`: one dataclass that a profile plus CLI flags resolve into, recorded in the manifest.

`CompressRecipe` holds every setting (also LoSA's, which `losa_deploy.losa.run` reads), and `validate()` checks
everything that can be checked without loading a model, so a bad flag fails before any work and writes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError

METHODS = ("magnitude", "wanda", "sparsegpt", "losa", "dense-lora")
# Methods that fine-tune adapters and take the LoSA flags: LoSA itself and the naive baseline it is compared with
# (prune once, train a plain dense LoRA, merge, re-prune; `losa_deploy.losa.baseline`).
ADAPTER_METHODS = ("losa", "dense-lora")
ALLOCATIONS = ("uniform", "atp", "owl", "rmi")
OBJECTIVES = ("lm", "distill")
MASK_METHODS = ("wanda", "sparsegpt")
CALIB_DTYPES = ("float32", "bfloat16", "auto")
# linear: warmup, then decay over all steps; wsd: warmup, hold the peak, decay during the last step only.
LR_SCHEDULES = ("linear", "wsd")
DEFAULT_SPARSITY = 0.5
# Field -> the key a profile writes (the flag without its dashes), where the two differ. Messages use these names.
USER_KEYS = {
    "losa_steps": "steps", "losa_rank_min": "rank_start", "losa_rank_max": "rank_end", "losa_rank_cap": "rank_cap",
    "losa_train_data": "train_data", "losa_train_samples": "train_samples", "losa_train_seqlen": "train_seqlen",
    "losa_objective": "objective", "losa_mask_method": "mask_method", "losa_alpha": "lora_alpha",
    "losa_dropout": "dropout", "losa_lr": "lr", "losa_batch_size": "batch_size", "losa_uniform_ranks": "uniform_ranks",
    "losa_lr_schedule": "lr_schedule",
}


def user_key(field_name: str) -> str:
    """The name a user writes for a recipe field (profile key; the flag is it with dashes)."""
    return USER_KEYS.get(field_name, field_name)


@dataclass
class CompressRecipe:
    """Every `compress` setting. `None` for sparsity means "the default for the pattern" (N:M fixes it)."""

    out: str = ""
    model: str = "smollm2-135m"
    method: str = "wanda"
    pattern: str = "unstructured"
    sparsity: float | None = None
    allocation: str = "uniform"
    atp_beta: float | str | None = None  # float, "auto", or None (= auto when allocation is atp)
    atp_grid: int = 6
    tune_data: str | None = None  # ATP auto tuning text; default: held-out windows of the calibration source
    tune_samples: int = 8
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    rmi_beta: float = 1.0
    calib_data: str = "self"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    ignore: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    calib_dtype: str = "float32"  # block forwards during calibration: float32 | bfloat16 | auto
    offload: bool = False
    eval_data: str | None = None
    eval_seqlen: int = 2048
    eval_max_tokens: int | None = None
    eval_before: bool = True
    overwrite: bool = False
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT damping, fraction of mean diag(H)
    # LoSA (read by losa_deploy.losa.run)
    losa_steps: int = 5
    losa_rank_min: int = 6  # average rank at the first step
    losa_rank_max: int = 10  # average rank at the last step
    losa_rank_cap: int = 16  # per-block rank ceiling (adapters are allocated at this rank)
    losa_alpha: float = 16.0
    losa_dropout: float = 0.1
    losa_lr: float = 2e-4
    losa_lr_schedule: str = "linear"
    losa_train_data: str = "self"
    losa_train_samples: int = 256
    losa_train_seqlen: int = 256
    losa_objective: str = "lm"
    losa_mask_method: str = "wanda"
    losa_batch_size: int = 4
    losa_uniform_ranks: bool = False  # ablation: same rank for every block instead of reconstruction-error allocation
    resume: bool = False

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def target_sparsity(self) -> float:
        """The model's mean target sparsity: fixed by an N:M pattern, else `sparsity` (default 0.5)."""
        kind, n, m = _pattern_parts(self.pattern)
        if kind == "nm":
            return 1.0 - n / m
        return DEFAULT_SPARSITY if self.sparsity is None else float(self.sparsity)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "CompressRecipe":
        """Build from merged profile+CLI settings (profile keys may use dashes); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        aliases = {user: f for f, user in USER_KEYS.items()} | {"alpha": "losa_alpha", "lora_dropout": "losa_dropout"}
        kw: dict[str, Any] = {}
        for k, v in settings.items():
            key = k.replace("-", "_")
            key = aliases.get(key, key)
            if key not in names:
                import difflib

                known = sorted(user_key(n) for n in names)
                close = difflib.get_close_matches(k.replace("-", "_"), known, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise UserError(f"unknown compress setting '{k}' (in the profile or flags); {hint}"
                                f"known: {', '.join(known)}")
            kw[key] = v
        if "ignore" in kw and isinstance(kw["ignore"], str):
            kw["ignore"] = [kw["ignore"]]
        if "ignore" in kw:
            kw["ignore"] = list(kw["ignore"] or [])
        return cls(**kw)

    def validate(self) -> None:
        """Every check that needs no model. One-line UserError for each mistake."""
        if not self.out:
            raise UserError("--out DIR is required")
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}': use one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise UserError(f"unknown allocation '{self.allocation}': use one of {', '.join(ALLOCATIONS)}")
        kind, n, m = _pattern_parts(self.pattern)
        if self.sparsity is not None:
            s = self.sparsity
            if not isinstance(s, (int, float)) or math.isnan(s) or not 0.0 <= s < 1.0:
                raise UserError(f"--sparsity must be in [0, 1) (got {s})")
        if kind == "nm":
            if self.sparsity is not None and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise UserError(
                    f"pattern {self.pattern} means {1 - n / m:.4g} sparsity, not {self.sparsity}; drop --sparsity or use mixed:{m}"
                )
            if self.allocation != "uniform":
                raise UserError(f"a fixed {self.pattern} pattern has one rate for every block; use --pattern mixed:{m} for --allocation {self.allocation}")
        if isinstance(self.atp_beta, str):
            if self.atp_beta != "auto":
                try:
                    self.atp_beta = float(self.atp_beta)
                except ValueError:
                    raise UserError(f"--atp-beta must be a number or 'auto' (got '{self.atp_beta}')")
        if self.atp_beta is not None and self.allocation != "atp":
            raise UserError(f"--atp-beta only applies to --allocation atp (got --allocation {self.allocation})")
        if isinstance(self.atp_beta, float) and not self.atp_beta > 0:
            raise UserError(f"--atp-beta must be > 0 (got {self.atp_beta})")
        if self.atp_grid < 2:
            raise UserError(f"atp_grid must be >= 2: the ATP grid needs at least 2 values (got {self.atp_grid})")
        if not self.owl_m > 0:
            raise UserError(f"--owl-m must be > 0 (got {self.owl_m})")
        if not 0 <= self.owl_lambda < 1:
            raise UserError(f"--owl-lambda must be in [0, 1) (got {self.owl_lambda})")
        if not self.rmi_beta > 0:
            raise UserError(f"--rmi-beta must be > 0 (got {self.rmi_beta})")
        if self.nsamples < 1:
            raise UserError(f"--nsamples must be >= 1 (got {self.nsamples})")
        if self.seqlen <= 1:
            raise UserError(f"--seqlen must be > 1 (got {self.seqlen})")
        if self.eval_seqlen <= 1:
            raise UserError(f"--eval-seqlen must be > 1 (got {self.eval_seqlen})")
        if self.eval_max_tokens is not None and self.eval_max_tokens < self.eval_seqlen:
            raise UserError(f"--eval-max-tokens ({self.eval_max_tokens}) must be at least one window (--eval-seqlen {self.eval_seqlen})")
        if self.tune_samples < 1:
            raise UserError(f"tune_samples must be >= 1 (got {self.tune_samples})")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"unknown --dtype '{self.dtype}': use float32, bfloat16 or float16")
        if self.calib_dtype not in CALIB_DTYPES:
            raise UserError(f"unknown --calib-dtype '{self.calib_dtype}': use one of {', '.join(CALIB_DTYPES)}")
        if not 0 < self.percdamp < 1:
            raise UserError(f"percdamp must be in (0, 1) (got {self.percdamp})")
        if self.blocksize < 1:
            raise UserError(f"blocksize must be >= 1 (got {self.blocksize})")
        for name in ("calib_data", "eval_data", "tune_data", "losa_train_data"):
            check_data_path(getattr(self, name), "--" + name.replace("_", "-").replace("losa-", ""))
        if self.method in ADAPTER_METHODS:
            if self.method == "dense-lora" and self.resume:
                raise UserError("--resume applies to --method losa only: a dense-lora run is one shot, start it again")
            if self.losa_steps < 1:
                raise UserError(f"--steps must be >= 1 (got {self.losa_steps})")
            if self.method == "dense-lora":  # one rank for every block: --rank-end (--rank-start does not apply)
                if not 1 <= self.losa_rank_max <= self.losa_rank_cap:
                    raise UserError(f"--rank-end ({self.losa_rank_max}) must lie in [1, --rank-cap {self.losa_rank_cap}]")
            elif not 1 <= self.losa_rank_min <= self.losa_rank_max <= self.losa_rank_cap:
                raise UserError(
                    f"ranks must satisfy 1 <= --rank-start ({self.losa_rank_min}) <= --rank-end ({self.losa_rank_max}) <= --rank-cap ({self.losa_rank_cap})"
                )
            if self.losa_lr_schedule not in LR_SCHEDULES:
                raise UserError(f"unknown --lr-schedule '{self.losa_lr_schedule}': use one of {', '.join(LR_SCHEDULES)}")
            if self.losa_objective not in OBJECTIVES:
                raise UserError(f"unknown --objective '{self.losa_objective}': use one of {', '.join(OBJECTIVES)}")
            if self.losa_mask_method not in MASK_METHODS:
                raise UserError(f"unknown --mask-method '{self.losa_mask_method}': use one of "
                                f"{', '.join(MASK_METHODS)}")
            if self.losa_train_samples < 1 or self.losa_train_seqlen <= 1 or self.losa_batch_size < 1:
                raise UserError("--train-samples, --train-seqlen and --batch-size must be positive")
            if not 0.0 <= self.losa_dropout < 1.0:
                raise UserError(f"--lora-dropout must be in [0, 1) (got {self.losa_dropout})")
            if not self.losa_alpha > 0:
                raise UserError(f"--lora-alpha must be > 0 (got {self.losa_alpha})")
        out = Path(self.out).expanduser()
        if out.exists() and not self.overwrite:
            raise UserError(f"output '{out}' already exists; pass --overwrite or choose another --out")
        if out.exists() and not out.is_dir():
            raise UserError(f"output '{out}' exists and is not a directory")


def check_data_path(spec: str | None, flag: str) -> None:
    from .data import DATASETS, SELF, TEXT_SUFFIXES

    if spec is None or spec == SELF or spec.split(":", 1)[0] in DATASETS:
        return
    p = Path(spec).expanduser()
    looks_like_file = "/" in spec or spec.endswith(TEXT_SUFFIXES + (".json", ".jsonl", ".parquet"))
    if looks_like_file and not p.is_file():
        raise UserError(f"{flag}: data file '{spec}' not found")
    if not looks_like_file and not p.exists():
        raise UserError(f"{flag}: unknown data source '{spec}': give a file path, one of {', '.join(DATASETS)}, or 'self'")


def _pattern_parts(text: str) -> tuple[str, int, int]:
    """("unstructured"|"nm"|"mixed", n, m), parsed with the pure helper when present, else locally (same rules)."""
    try:
        from .pruning.masks import parse_pattern

        p = parse_pattern(text)
        kind = str(getattr(p, "kind", "")).lower()
        n, m = int(getattr(p, "n", 0) or 0), int(getattr(p, "m", 0) or 0)
        if kind.startswith("unstr"):
            return "unstructured", 0, 0
        if kind.startswith("mix"):
            return "mixed", 0, m
        return "nm", n, m
    except ImportError:
        pass
    t = text.strip().lower()
    if t == "unstructured":
        return "unstructured", 0, 0
    if t.startswith("mixed:"):
        try:
            m = int(t.split(":", 1)[1])
        except ValueError:
            raise UserError(f"unknown pattern '{text}': use unstructured, N:M (e.g. 2:4) or mixed:M (e.g. mixed:8)")
        if m < 2:
            raise UserError(f"pattern '{text}': M must be >= 2")
        return "mixed", 0, m
    if ":" in t:
        try:
            n, m = (int(x) for x in t.split(":", 1))
        except ValueError:
            raise UserError(f"unknown pattern '{text}': use unstructured, N:M (e.g. 2:4) or mixed:M (e.g. mixed:8)")
        if not 0 < n < m:
            raise UserError(f"pattern '{text}': need 0 < N < M (N = kept weights of every M)")
        return "nm", n, m
    raise UserError(f"unknown pattern '{text}': use unstructured, N:M (e.g. 2:4) or mixed:M (e.g. mixed:8)")


def pattern_parts(text: str) -> tuple[str, int, int]:
    return _pattern_parts(text)


@dataclass
class PruneSpec:
    """What the sequential pipeline does to each block: method, mask structure, per-block N (mixed), ignores."""

    method: str = "wanda"  # magnitude | wanda | sparsegpt
    pattern: str = "unstructured"  # unstructured | N:M | mixed:M
    n_per_block: Sequence[int] | None = None  # mixed:M only: kept N of M for each block
    ignore: Sequence[str] = ()
    blocksize: int = 128
    percdamp: float = 0.01

    def block_target(self, index: int, rate: float) -> tuple[float, int, int]:
        """(target sparsity, n, m) of block `index`; n = m = 0 for unstructured."""
        kind, n, m = _pattern_parts(self.pattern)
        if kind == "nm":
            return 1.0 - n / m, n, m
        if kind == "mixed":
            if self.n_per_block is None:
                raise ValueError("mixed pattern needs n_per_block")
            n_i = int(self.n_per_block[index])
            return 1.0 - n_i / m, n_i, m
        return float(rate), 0, 0

    def pattern_label(self, index: int) -> str:
        kind, n, m = _pattern_parts(self.pattern)
        if kind == "unstructured":
            return "unstructured"
        _, n_i, m_i = self.block_target(index, 0.0)
        return f"{n_i}:{m_i}"
