"""`losa-deploy export`: not implemented yet (see the project's issues)."""

from __future__ import annotations

import typer

from .cli import app
from .errors import UserError


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export(ctx: typer.Context) -> None:
    """Not implemented yet."""
    raise UserError("'export' is not implemented yet", exit_code=2)
