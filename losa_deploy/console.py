"""Shared Rich consoles: results to stdout, progress and messages to stderr (so --json output stays clean)."""

from rich.console import Console

out = Console()
err = Console(stderr=True)
