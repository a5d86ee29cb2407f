"""The `losa-deploy` Typer app: root options (--version, --debug), and `main()`, which turns errors and
interrupts into one line and an exit code.

The commands live in sibling modules (compress, export, bench, evaluate) that add themselves to `app`;
`losa_deploy/cli/__init__.py` imports them. This module imports none of them.
"""

from __future__ import annotations

import sys

import typer

from .. import __version__
from ..console import err, out
from ..errors import UserError

app = typer.Typer(
    name="losa-deploy",
    help="Turn a dense Hugging Face causal LM into a fast sparse model, and prove it.\n\n"
    "Typical flow: compress -> export -> bench. Example:\n\n"
    "  losa-deploy compress --profile cpu-70pct --out runs/sparse70\n\n"
    "  losa-deploy export runs/sparse70 --format deepsparse\n\n"
    "  losa-deploy bench runs/sparse70 --baseline smollm2-135m",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
profiles_app = typer.Typer(help="List and show named profiles (profiles/*.toml).", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"losa-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks, and third-party warnings and logs."),
) -> None:
    from ..quiet import configure

    _state["debug"] = debug
    configure(debug)


def main() -> None:
    from ..errors import install_signal_handlers, restore_signal_handlers

    previous = install_signal_handlers()
    try:
        _run_app()
    finally:
        restore_signal_handlers(previous)


def _run_app() -> None:
    from ..errors import environment_error

    try:
        app()
    except UserError as e:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except SystemExit as e:  # Typer turns Ctrl-C (and so SIGTERM / SIGHUP, see errors.Interrupted) into exit 130
        ki = _interrupt_cause(e)
        if ki is None:
            raise
        _interrupted(ki)
    except KeyboardInterrupt as e:
        _interrupted(e)
    except Exception as e:  # a bug, not a user mistake: still one line unless --debug
        env = environment_error(e)
        if env is not None and not _state["debug"]:
            err.print(f"[bold red]error:[/bold red] {env}", highlight=False, soft_wrap=True)
            sys.exit(env.exit_code)
        if _state["debug"] or "--debug" in sys.argv:
            raise
        err.print(f"[bold red]internal error:[/bold red] {type(e).__name__}: {e} (rerun with --debug for the "
                  "traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)


def _interrupt_cause(e: BaseException) -> KeyboardInterrupt | None:
    seen: BaseException | None = e
    while seen is not None and not isinstance(seen, KeyboardInterrupt):
        seen = seen.__cause__ or seen.__context__
    return seen


def _interrupted(e: KeyboardInterrupt) -> None:
    """One line, exit 130 (SIGINT) or 128 + signal; `e.hint` (set by compress) says what was kept."""
    from ..errors import interrupt_exit_code

    hint = getattr(e, "hint", None) or "partial output removed"
    err.print(f"[yellow]interrupted[/yellow] ({str(e) or 'SIGINT'}): {hint}", highlight=False, soft_wrap=True)
    sys.exit(interrupt_exit_code(e))
