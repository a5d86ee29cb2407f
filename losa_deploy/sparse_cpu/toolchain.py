"""Build the sparse-cpu kernel library from its C sources with the machine's C compiler.

Why at set-up or first use, into a cache: no prebuilt binaries ship and nothing is downloaded. The library lands in
`$LOSA_DEPLOY_CACHE/sparse-cpu/<hash>/` (default `~/.cache/losa-deploy`), where the hash covers the sources, the
compiler's version and the flags, so an edit or a new compiler rebuilds and an unchanged tree reuses the file. It is
compiled to a temporary name and renamed, so a crash never leaves a half-written library that later loads.

No `-march=native`: the AVX2 and AVX-512 kernels carry per-function target attributes and are chosen at run time,
so one build runs on any x86-64 machine.

`python -m losa_deploy.sparse_cpu.build` (build.py) runs `build()` and reports what the loaded library offers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import UserError

CSRC = Path(__file__).resolve().parent / "csrc"
LIB_NAME = "liblosa_sparse.so"
CFLAGS = ("-O3", "-fPIC", "-shared", "-std=gnu11", "-pthread", "-fopenmp-simd", "-ffp-contract=off", "-Wall")
LDLIBS = ("-lm",)


def cache_root() -> Path:
    env = os.environ.get("LOSA_DEPLOY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "losa-deploy"


def compiler() -> str:
    """The C compiler: $CC if set, else gcc. A missing one is a UserError (the runtime cannot work without it)."""
    cc = os.environ.get("CC") or "gcc"
    path = shutil.which(cc.split()[0])
    if path is None:
        raise UserError(f"no C compiler '{cc}' found: install gcc (or set CC) to build the sparse-cpu kernels")
    return cc


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"C compiler '{cc}' does not run: {e}") from None
    if out.returncode != 0:
        raise UserError(f"C compiler '{cc}' does not run: {(out.stderr or out.stdout).strip().splitlines()[:1]}")
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else cc


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.c"))


def build_key(cc: str) -> str:
    """Hash of every source and header, the compiler's version and the flags."""
    h = hashlib.sha256()
    for p in sorted([*CSRC.glob("*.c"), *CSRC.glob("*.h")]):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(_compiler_version(cc).encode() + b"\0" + " ".join(CFLAGS + LDLIBS).encode())
    h.update(cc.encode())
    return h.hexdigest()[:16]


def library_path(cc: str | None = None) -> Path:
    cc = cc or compiler()
    return cache_root() / "sparse-cpu" / build_key(cc) / LIB_NAME


def build(force: bool = False) -> Path:
    """Compile all csrc/*.c into one shared library (unless the cached one matches) and return its path."""
    cc = compiler()
    target = library_path(cc)
    if target.is_file() and not force:
        return target
    srcs = sources()
    if not srcs:
        raise UserError(f"no C sources in {CSRC}: the package is incomplete, reinstall it")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{LIB_NAME}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    cmd = [*cc.split(), *CFLAGS, "-I", str(CSRC), "-o", tmp, *map(str, srcs), *LDLIBS]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            log = target.parent / "build-error.log"
            log.write_text(" ".join(cmd) + "\n\n" + out.stderr)
            first = next((ln for ln in out.stderr.splitlines() if "error" in ln), out.stderr.strip()[:200])
            raise UserError(f"building the sparse-cpu kernels failed: {first.strip()} (full log: {log})")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except subprocess.TimeoutExpired:
        raise UserError("building the sparse-cpu kernels timed out after 600 s") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target
