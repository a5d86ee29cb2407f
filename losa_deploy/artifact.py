"""The compress output directory: the one contract between `compress` and what reads its result.

Only this module knows the file names and how to read and write them:

    <out>/model*.safetensors, config.json, tokenizer   a vanilla Hugging Face checkpoint (save_pretrained)
    <out>/sparsity_masks.safetensors                   explicit keep-masks (uint8, 1 = keep) keyed by parameter name
    <out>/losa_manifest.json                           the manifest (its schema: manifest.py)
    <export>/export_manifest.json                      how an export was verified

and what a run leaves beside `<out>` while it works:

    .<name>.partial-<pid>-*   the directory being written (atomic_dir), renamed to <out> once whole
    .<name>.losa-work         LoSA's last finished step, kept for --resume until the run succeeds

Masks are the contract: every consumer of a compressed checkpoint (each export format, evaluate, bench, generate)
checks the weights against the masks first. A masked weight that is non-zero means the checkpoint was changed after
`compress`, and it is refused; a checkpoint without a masks file is taken as it is (dense, or masks from W != 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from .atomic import file_mode, partial_prefix, remove_stale_partials, stale_partials, write_json  # noqa: F401
from .errors import UserError

MASKS_NAME = "sparsity_masks.safetensors"
MANIFEST_NAME = "losa_manifest.json"
EXPORT_MANIFEST_NAME = "export_manifest.json"
_WORK = ".losa-work"
_NOT_WEIGHTS = (MASKS_NAME,)  # *.safetensors in a model directory that are not its weights
_NOT_WEIGHT_SUFFIX = ".compact.safetensors"  # the compact format of losa-deploy <= 0.1 (no longer written)


# ---- names --------------------------------------------------------------------------------------------------------

def weight_files(directory: str | Path) -> list[Path]:
    """The checkpoint's weight files (*.safetensors, without the masks or a compact export)."""
    return [f for f in sorted(Path(directory).glob("*.safetensors"))
            if f.name not in _NOT_WEIGHTS and not f.name.endswith(_NOT_WEIGHT_SUFFIX)]


def work_dir(out: str | Path) -> Path:
    """Where a LoSA run on `out` keeps its step checkpoint (`.<name>.losa-work` beside it)."""
    out = Path(out)
    return out.parent / f".{out.name}{_WORK}"


# ---- manifest -----------------------------------------------------------------------------------------------------

def write_manifest(directory: str | Path, man: dict[str, Any]) -> Path:
    from .manifest import validate_manifest

    validate_manifest(man, where=str(directory))
    return write_json(Path(directory) / MANIFEST_NAME, man)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a compress output directory; UserError if missing, unreadable or of an unknown schema."""
    from .manifest import validate_manifest

    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"'{directory}' has no {MANIFEST_NAME}: not a losa-deploy compress output")
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}); re-run compress")
    validate_manifest(man, where=str(path))
    return man


def has_manifest(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST_NAME).is_file()


def manifest_or_none(directory: str | Path) -> dict[str, Any] | None:
    """The manifest when the directory has one (validated), else None: a checkpoint from elsewhere."""
    return read_manifest(directory) if has_manifest(directory) else None


def prunable_weights(directory: str | Path) -> dict[str, dict[str, Any]]:
    """{weight name: {target, realised, pattern, block}} of the weights compress pruned, as its manifest records
    them ({} without a manifest)."""
    man = manifest_or_none(directory)
    return dict(man["linears"]) if man else {}


def block_rates(directory: str | Path) -> list[float] | None:
    """Per-block target rates from the manifest, in block order; None without a manifest or rates."""
    man = manifest_or_none(directory)
    blocks = (man or {}).get("blocks") or []
    if blocks and all("rate" in b for b in blocks):
        return [float(b["rate"]) for b in sorted(blocks, key=lambda b: b.get("index", 0))]
    return None


def write_export_manifest(directory: str | Path, man: dict[str, Any]) -> Path:
    return write_json(Path(directory) / EXPORT_MANIFEST_NAME, man)


def read_export_manifest(directory: str | Path) -> dict[str, Any]:
    """An export directory's manifest, {} when there is none or it cannot be read."""
    try:
        man = json.loads((Path(directory) / EXPORT_MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return man if isinstance(man, dict) else {}


def has_export_manifest(directory: str | Path) -> bool:
    return (Path(directory) / EXPORT_MANIFEST_NAME).is_file()


# ---- weights and masks --------------------------------------------------------------------------------------------

def read_weights(directory: str | Path) -> dict[str, Any]:
    """Every tensor of the checkpoint's weight files (torch); a damaged file is the same one-line error as
    `models.load_model` gives."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = weight_files(directory)
    if not files:
        raise UserError(f"'{directory}' has no model *.safetensors weights")
    state: dict[str, Any] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise _corrupt(directory, e)
    return state


def save_masks(directory: str | Path, masks: Mapping[str, Any]) -> Path:
    import torch
    from safetensors.torch import save_file

    path = Path(directory) / MASKS_NAME
    save_file({k: v.detach().to("cpu", torch.uint8).contiguous() for k, v in masks.items()}, str(path),
              metadata={"format": "losa-deploy-masks", "keep": "1"})
    return path


def load_masks(directory: str | Path) -> dict[str, Any]:
    """{weight name: bool mask (True = keep)}; UserError if the file is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / MASKS_NAME
    if not path.is_file():
        raise UserError(f"'{directory}' has no {MASKS_NAME}; masks can be derived from W != 0 instead")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt ({_first_line(e)}); re-run compress")
    return {k: v.bool() for k, v in raw.items()}


def has_masks(directory: str | Path) -> bool:
    return (Path(directory) / MASKS_NAME).is_file()


def save_checkpoint(directory: str | Path, model: Any, tokenizer: Any, masks: Mapping[str, Any]) -> None:
    """HF checkpoint (safetensors + config + generation config + tokenizer) and the masks, into `directory`."""
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    save_masks(directory, masks)
    for f in Path(directory).iterdir():  # some writers create 0600 files; a checkpoint is meant to be shared
        if f.is_file():
            f.chmod(file_mode())


def masked_nonzeros(weight: Any, keep: Any) -> int:
    """How many entries of `weight` are non-zero where the bool mask `keep` says pruned (False)."""
    import torch

    return int(torch.count_nonzero(weight.ne(0) > keep))  # True > False: non-zero and pruned


def check_masks(directory: str | Path, weights: Mapping[str, Any] | None = None, *, note: bool = True) -> str:
    """Refuse a checkpoint whose weights disagree with its masks; return where the masks come from.

    `weights`: {parameter name: tensor} already in memory (a loaded model's parameters); None reads them from the
    checkpoint's files one tensor at a time. Without a masks file the checkpoint is accepted as dense-or-inferred,
    with a note when `note`.
    """
    masks = _checked_masks(Path(directory), weights, note)
    return MASKS_NAME if masks is not None else f"weights != 0 (no {MASKS_NAME})"


def _checked_masks(directory: Path, weights: Mapping[str, Any] | None, note: bool) -> dict[str, Any] | None:
    """The masks once the weights agree with them (None: no masks file)."""
    if not has_masks(directory):
        if note:
            from .console import err

            err.print(f"note: '{directory}' has no {MASKS_NAME}: taking its weights as they are (dense, or masks "
                      "inferred from W != 0)", highlight=False, markup=False, soft_wrap=True)
        return None
    masks = load_masks(directory)
    bad: list[tuple[str, int]] = []
    with _weight_source(directory, weights) as get:
        for name, keep in masks.items():
            w = get(name)
            if w is None:
                raise UserError(f"{directory / MASKS_NAME} has a mask for '{name}', which the checkpoint does not "
                                "have; re-run compress")
            if tuple(w.shape) != tuple(keep.shape):
                raise UserError(f"{MASKS_NAME}: mask '{name}' has shape {tuple(keep.shape)}, weight has "
                                f"{tuple(w.shape)}; re-run compress")
            n = masked_nonzeros(w, keep.to(w.device))
            if n:
                bad.append((name, n))
    if bad:
        name, n = bad[0]
        more = f" (and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
        raise UserError(f"'{directory}': {name} has {n} non-zero weight{'s' if n != 1 else ''} where {MASKS_NAME} "
                        f"says pruned{more}; the weights changed after compress: re-run compress, or delete "
                        f"{MASKS_NAME} to take the weights as they are")
    return masks


@contextlib.contextmanager
def _weight_source(directory: Path, weights: Mapping[str, Any] | None) -> Any:
    if weights is not None:
        yield weights.get
        return
    from safetensors import SafetensorError, safe_open

    files = weight_files(directory)
    if not files:
        raise UserError(f"'{directory}' has no model *.safetensors weights")
    with contextlib.ExitStack() as stack:
        where: dict[str, Any] = {}
        try:
            for f in files:
                h = stack.enter_context(safe_open(str(f), framework="pt"))
                where.update({k: h for k in h.keys()})
        except (SafetensorError, OSError, ValueError) as e:
            raise _corrupt(directory, e)

        def get(name: str) -> Any:
            if name not in where:
                return None
            try:
                return where[name].get_tensor(name)
            except (SafetensorError, OSError, ValueError) as e:
                raise _corrupt(directory, e)

        yield get


def export_masks(directory: str | Path, weights: Mapping[str, Any],
                 all_weights: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Keep-masks (numpy bool, True = keep) for `weights` (the block linears an exporter checks): the checkpoint's
    masks once they agree with the weights (`all_weights`, default `weights`), W != 0 for the rest; and where they
    came from, for the export manifest."""
    file_masks = _checked_masks(Path(directory), all_weights if all_weights is not None else weights, note=True)
    source = MASKS_NAME if file_masks is not None else f"weights != 0 (no {MASKS_NAME})"
    file_masks = file_masks or {}
    out: dict[str, Any] = {}
    for k, w in weights.items():
        m = file_masks.get(k)
        out[k] = m.numpy() if m is not None else w.detach().cpu().numpy() != 0
    return out, source


def named_weights(model: Any) -> dict[str, Any]:
    """{parameter name: tensor} of a loaded model, the form `check_masks` compares with the masks."""
    return dict(model.named_parameters())


# ---- the output directory's room ----------------------------------------------------------------------------------

def checkpoint_bytes(directory: str | Path, dtype_bytes: int | None = None) -> int:
    """Bytes of the checkpoint's weights (re-counted at `dtype_bytes` per value when given), from the file headers."""
    files = weight_files(directory)
    if dtype_bytes is None:
        return sum(f.stat().st_size for f in files)
    from safetensors import SafetensorError, safe_open

    n = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    numel = 1
                    for s in h.get_slice(k).get_shape():
                        numel *= int(s)
                    n += numel
        except (SafetensorError, OSError, ValueError) as e:
            raise _corrupt(directory, e)
    return n * dtype_bytes


def check_output_room(out: str | Path, need_bytes: int, flag: str = "--out") -> None:
    """Before the expensive work: `out` can be created and written, and its file system has about `need_bytes` free.

    Tries a real file in the nearest existing ancestor (root ignores permission bits, and a read-only mount only
    shows on a write), and compares the estimate with `shutil.disk_usage`.
    """
    import errno
    import tempfile

    out = Path(out).expanduser().absolute()
    base = out.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{flag} '{out}': '{base}' is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".losa-deploy-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
               errno.EDQUOT: "disk quota exceeded"}.get(e.errno or 0, os.strerror(e.errno) if e.errno else str(e))
        raise UserError(f"{flag} '{out}': cannot write in '{base}' ({why.lower()}); choose another {flag}")
    free = shutil.disk_usage(base).free
    if need_bytes > free:
        raise UserError(f"{flag} '{out}': about {need_bytes / 2**20:.0f} MiB needed but only {free / 2**20:.0f} MiB "
                        f"free in '{base}'; free some space or choose another {flag}")


def _corrupt(directory: str | Path, e: BaseException) -> UserError:
    """The same words as `models.load_model` uses for a checkpoint it cannot read."""
    return UserError(f"could not load model '{directory}' (corrupt or incomplete checkpoint?): {_first_line(e)}")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__
