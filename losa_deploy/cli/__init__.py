"""The `losa-deploy` command line: thin Typer commands that parse, load a profile, call, and print.

`app.py` holds the Typer app and `main()`; each command module adds its commands to that app and imports nothing
from this package's `__init__`. Importing them here, in the order `--help` lists them, registers the commands.
"""

# isort: off
from . import evaluate  # noqa: F401
from . import profiles  # noqa: F401  (profiles list, profiles show)
from . import bench  # noqa: F401
from . import compress  # noqa: F401
from . import export  # noqa: F401
from . import generate  # noqa: F401
from .app import app, main  # last: binds `app` here to the Typer app, not the module of that name

# isort: on

__all__ = ["app", "main"]
