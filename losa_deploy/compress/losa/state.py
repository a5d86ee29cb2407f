"""LoSA checkpoints: one file per run directory, replaced atomically after every completed step.

The file holds everything the remaining steps depend on (prunable base weights, masks, adapters with their
ranks, optimiser and scheduler state, RNG states, the step index, the history for the manifest) and a
fingerprint of the recipe, so a resume from a different recipe is refused instead of silently mixing runs.
A Ctrl-C while saving leaves the previous checkpoint in place (temp file + os.replace).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...atomic import write_with
from ...errors import UserError

STATE_FILE = "losa_state.pt"
# Settings that do not change what LoSA computes (where it writes, evaluation, resume itself).
_NOT_FINGERPRINTED = {"out", "overwrite", "resume", "eval_data", "eval_seqlen", "eval_max_tokens", "eval_before"}


def recipe_fingerprint(recipe: dict[str, Any], calib_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """The settings (and calibration tokens) a resumed run must share with the interrupted one."""
    fp = {k: v for k, v in sorted(recipe.items()) if k not in _NOT_FINGERPRINTED}
    if calib_ids is not None:
        fp["calib_sha256"] = hashlib.sha256(calib_ids.cpu().numpy().tobytes()).hexdigest()[:16]
    return json.loads(json.dumps(fp, default=str))


def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_state(work_dir: Path, state: dict[str, Any]) -> Path:
    """torch.save to a temporary sibling, fsync, then rename over the previous checkpoint."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    final = work_dir / STATE_FILE
    return write_with(final, lambda f: torch.save(state, f))


def load_state(work_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The last complete step's state, or None when there is none; UserError if it is from another recipe."""
    path = Path(work_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a checkpoint is only ever replaced whole, so this is not our partial write
        raise UserError(f"--resume: cannot read LoSA checkpoint {path} ({type(e).__name__}); delete it to start over")
    old = state.get("fingerprint", {})
    if old != fingerprint:
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        raise UserError(
            f"--resume: {path.parent} holds a LoSA run with a different recipe (differs in: {', '.join(diff)}); "
            "use the same settings or start a new --out"
        )
    return state
