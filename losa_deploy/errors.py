"""One exception type for mistakes a user can fix; the CLI turns it into a one-line message."""

from __future__ import annotations

import errno
import signal


class UserError(Exception):
    """An input problem with a message that says what to do. Exit code 2 by default."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every `finally`/`atomic_dir` cleans up the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum: int, frame: object) -> None:
    """Signal handler: the first SIGTERM/SIGHUP becomes `Interrupted`; repeats are ignored so the cleanup finishes."""
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def install_signal_handlers() -> dict[int, object]:
    """Handle SIGTERM (timeout, kill, batch schedulers) and SIGHUP (closed terminal) like SIGINT; returns the
    previous handlers for `restore_signal_handlers` (nothing is installed outside the main thread).

    A signal the parent set to ignore stays ignored: `nohup losa-deploy ...` must survive the terminal closing, as
    a background job of a script survives Ctrl-C (Python itself leaves an inherited ignored SIGINT alone)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    wanted = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) is not signal.SIG_IGN]
    return {s: signal.signal(s, raise_interrupted) for s in wanted}


def restore_signal_handlers(previous: dict[int, object]) -> None:
    for s, h in previous.items():
        signal.signal(s, h)  # type: ignore[arg-type]


def interrupt_exit_code(e: BaseException) -> int:
    """130 for Ctrl-C (SIGINT), 128 + the signal's number otherwise (143 SIGTERM, 129 SIGHUP): the shell's rule."""
    return 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)


_ENV_ERRNOS = {  # errno: (what happened, what to do)
    errno.EROFS: ("read-only file system", "choose a writable --out"),
    errno.ENOSPC: ("no space left on device", "free some space or choose another --out"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another --out"),
    errno.EACCES: ("permission denied", "check the permissions or choose another --out"),
    errno.EPERM: ("operation not permitted", "check the permissions or choose another --out"),
    errno.ENOENT: ("no such file or directory", "check the path (was a directory removed while it ran?)"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "check the path"),
}
_SAFETENSORS = (("No space left", errno.ENOSPC), ("StorageFull", errno.ENOSPC), ("Read-only", errno.EROFS),
                ("ReadOnlyFilesystem", errno.EROFS), ("Permission denied", errno.EACCES),
                ("PermissionDenied", errno.EACCES))


def environment_error(e: BaseException) -> UserError | None:
    """The one-line error for a fault of the machine rather than of losa-deploy (read-only or full disk, permission,
    missing directory), or None when `e` is not one. safetensors reports them as a SafetensorError with text."""
    if isinstance(e, OSError) and e.errno in _ENV_ERRNOS:
        what, todo = _ENV_ERRNOS[e.errno]
        where = f": '{e.filename}'" if e.filename else ""
        return UserError(f"{what}{where}; {todo}")
    if type(e).__name__ == "SafetensorError":
        code = next((c for text, c in _SAFETENSORS if text in str(e)), None)
        if code is not None:
            what, todo = _ENV_ERRNOS[code]
            return UserError(f"{what} while writing safetensors weights; {todo}")
    return None
