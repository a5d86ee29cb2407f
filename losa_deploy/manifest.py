"""The `compress` manifest (`losa_manifest.json`): the versioned schema that `export` and `bench` read.

Schema `losa-deploy/compress`, version 1: recipe, per-block rates (N of M for mixed, rank for LoSA), per-linear
target/realised sparsity and pattern, calibration, library versions, timings, peak memory, eval before/after.
"""

from __future__ import annotations

import platform
from typing import Any

# Reading and writing the file is the artifact module's job; these names stay importable from here.
from .errors import UserError

SCHEMA = "losa-deploy/compress"
VERSION = 1
REQUIRED = ("schema", "version", "recipe", "blocks", "linears")


def library_versions() -> dict[str, str]:
    """Versions of everything that can change the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = {"losa_deploy": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "numpy", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def build_manifest(**sections: Any) -> dict[str, Any]:
    """A manifest dict with the schema header first; `sections` are recipe, blocks, linears, calibration, ..."""
    man: dict[str, Any] = {"schema": SCHEMA, "version": VERSION}
    man.update(sections)
    man.setdefault("versions", library_versions())
    validate_manifest(man, where="<new manifest>")
    return man


def validate_manifest(man: Any, where: str) -> None:
    if not isinstance(man, dict):
        raise UserError(f"{where}: not a losa-deploy manifest (expected a JSON object)")
    missing = [k for k in REQUIRED if k not in man]
    if missing:
        raise UserError(f"{where}: manifest is missing {', '.join(missing)}; re-run compress")
    if man["schema"] != SCHEMA:
        raise UserError(f"{where}: manifest schema is '{man['schema']}', expected '{SCHEMA}'")
    if not isinstance(man["version"], int) or man["version"] > VERSION:
        raise UserError(f"{where}: manifest version {man['version']} is newer than this losa-deploy understands "
                        f"({VERSION}); upgrade losa-deploy")
    if not isinstance(man["blocks"], list) or not isinstance(man["linears"], dict):
        raise UserError(f"{where}: manifest 'blocks' must be a list and 'linears' an object; re-run compress")
