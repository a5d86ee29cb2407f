"""Named profiles: TOML files that bundle command settings; CLI flags override them.

A profile file has a `description` and one table per command (`[compress]`, `[export]`, `[bench]`).
Profiles are searched in `$LOSA_DEPLOY_PROFILES`, `~/.config/losa-deploy/profiles`, then the shipped ones.
A path to a `.toml` file works as a profile name too.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from .errors import UserError


def profile_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("LOSA_DEPLOY_PROFILES"):
        dirs.append(Path(os.environ["LOSA_DEPLOY_PROFILES"]))
    dirs.append(Path.home() / ".config" / "losa-deploy" / "profiles")
    here = Path(__file__).resolve().parent
    # source checkout (top-level profiles/), then the installed copy the build puts in the package (setup.py)
    dirs += [here.parent / "profiles", here / "profiles_data"]
    return [d for d in dirs if d.is_dir()]


def list_profiles() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in profile_dirs():
        for p in sorted(d.glob("*.toml")):
            found.setdefault(p.stem, p)
    return found


def load_profile(name: str) -> dict[str, Any]:
    p = Path(name).expanduser()
    if p.suffix == ".toml":
        if not p.is_file():
            raise UserError(f"profile file '{name}' not found")
        path = p
    else:
        known = list_profiles()
        if name not in known:
            raise UserError(f"unknown profile '{name}'; known profiles: {', '.join(sorted(known)) or '(none)'}")
        path = known[name]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"profile '{path}' is not valid TOML: {e}")
    data.setdefault("name", path.stem)
    data["path"] = str(path)
    return data


def section(profile: dict[str, Any] | None, command: str) -> dict[str, Any]:
    """The settings a profile gives one command (empty when there is no profile)."""
    if not profile:
        return {}
    sec = profile.get(command, {})
    if not isinstance(sec, dict):
        raise UserError(f"profile '{profile.get('name')}': [{command}] must be a table")
    return dict(sec)


def merge(profile_settings: dict[str, Any], cli_settings: dict[str, Any]) -> dict[str, Any]:
    """CLI values win over profile values; a CLI value of None means 'not given'."""
    out = dict(profile_settings)
    out.update({k: v for k, v in cli_settings.items() if v is not None})
    return out


def profile_descriptions() -> list[tuple[str, str]]:
    """(name, description) of every profile found, in search order (what `profiles list` shows)."""
    return [(name, str(load_profile(name).get("description", ""))) for name in list_profiles()]
