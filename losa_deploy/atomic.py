"""Atomic writes: nothing a user sees is ever half-written (write to a temporary name, then rename)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


def file_mode(directory: bool = False) -> int:
    """The mode a plain `open()` (or `mkdir`) would give: 0666 (0777) less the umask; mkstemp's 0600 is not meant."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_with(path: str | os.PathLike, write: Callable[[BinaryIO], None], mode: int | None = None) -> Path:
    """Write `path` atomically through `write(binary_file)` (text, JSON, torch.save): temp file, fsync, rename.

    The file gets `mode`, by default the usual one (0644 under umask 022), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_with(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final`, on failure it is removed.

    An interrupted run (Ctrl-C, SIGTERM, crash) therefore never leaves a directory at `final` that looks complete,
    and an existing `final` is only replaced once the new one is whole. What a killed run (SIGKILL) left beside
    `final` is removed here, with a note (`remove_stale_partials`).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        from .errors import UserError

        raise UserError(f"output '{final}' already exists; pass --overwrite or choose another --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{partial_prefix(final)}{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, file_mode(directory=True))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _usual_modes(tmp)
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, backup)
    os.replace(tmp, final)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _usual_modes(directory: Path) -> None:
    """Files some writers create 0600 (mkstemp, safetensors' writer) get the usual mode: an output is for sharing."""
    usual = file_mode()
    for f in directory.rglob("*"):
        if f.is_file() and not f.is_symlink() and f.stat().st_mode & 0o777 == 0o600:
            f.chmod(usual)


# ---- what interrupted runs leave beside an output (names and clean-up of atomic_dir's temporary directories)

def partial_prefix(final: str | Path) -> str:
    """Name prefix of the temporary directory `atomic_dir` writes before it becomes `final`; the pid follows, so a
    later run can tell a dead run's leftover from a live one's."""
    return f".{Path(final).name}.partial-"


def stale_partials(final: str | Path) -> list[Path]:
    """`.<name>.partial-*` directories beside `final` whose writer is gone (killed, power cut)."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    found = []
    for p in sorted(final.parent.glob(partial_prefix(final) + "*")):
        pid = p.name[len(partial_prefix(final)):].split("-", 1)[0]
        if p.is_dir() and not (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))):
            found.append(p)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(final: str | Path) -> list[Path]:
    """Remove what interrupted runs left beside `final`, with a note for each; returns the removed paths."""
    from .console import err

    gone = []
    for p in stale_partials(final):
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            gone.append(p)
            err.print(f"note: removed {p.name}, left by an interrupted run", highlight=False, markup=False,
                      soft_wrap=True)
    return gone
