"""`losa-deploy profiles list|show`: the named profiles that losa_deploy.profiles finds."""

from __future__ import annotations

import json

import typer

from ..console import out
from .app import profiles_app


@profiles_app.command("list")
def profiles_list() -> None:
    """List the known profiles."""
    from rich.table import Table

    from ..profiles import profile_descriptions

    t = Table("profile", "description")
    for name, description in profile_descriptions():
        t.add_row(name, description)
    out.print(t)


@profiles_app.command("show")
def profiles_show(name: str = typer.Argument(..., help="Profile name or path to a .toml file.")) -> None:
    """Print a profile's settings."""
    from ..profiles import load_profile

    out.print_json(json.dumps(load_profile(name)))
