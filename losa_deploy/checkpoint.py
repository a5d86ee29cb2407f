"""The compressed checkpoint: a vanilla HF directory plus explicit masks (`sparsity_masks.safetensors`).

Masks are stored explicitly (uint8, 1 = keep, keyed by the weight's parameter name) so that the sparsity pattern
survives dtype round-trips and later steps never have to guess it from `W == 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import UserError

MASKS_NAME = "sparsity_masks.safetensors"


def save_masks(directory: str | Path, masks: dict[str, Tensor]) -> Path:
    from safetensors.torch import save_file

    path = Path(directory) / MASKS_NAME
    save_file({k: v.detach().to("cpu", torch.uint8).contiguous() for k, v in masks.items()}, str(path),
              metadata={"format": "losa-deploy-masks", "keep": "1"})
    return path


def load_masks(directory: str | Path) -> dict[str, Tensor]:
    """{weight name: bool mask (True = keep)}; UserError if the file is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / MASKS_NAME
    if not path.is_file():
        raise UserError(f"'{directory}' has no {MASKS_NAME}; masks can be derived from W != 0 instead")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__}); re-run compress")
    return {k: v.bool() for k, v in raw.items()}


def has_masks(directory: str | Path) -> bool:
    return (Path(directory) / MASKS_NAME).is_file()


def save_checkpoint(directory: str | Path, model: Any, tokenizer: Any, masks: dict[str, Tensor]) -> None:
    """HF checkpoint (safetensors + config + generation config + tokenizer) and the masks, into `directory`."""
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    save_masks(directory, masks)
    for f in Path(directory).iterdir():  # some writers create 0600 files; a checkpoint is meant to be shared
        if f.is_file():
            f.chmod(0o644)
