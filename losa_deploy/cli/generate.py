"""`losa-deploy generate`: greedy text from one runtime; the runner, its tokenizer and the decode loop are in
losa_deploy.runners."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..console import err, out
from ..errors import UserError
from .app import app


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="Model directory, or its deepsparse / sparse-cpu export directory."),
    runtime: str = typer.Option("torch", "--runtime",
                                help="torch | onnxruntime | deepsparse | torch-2of4 | sparse-cpu"),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    prefill_len: Optional[int] = typer.Option(None, "--prefill-len",
                                              help="Default: the export's prefill length (or 128)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Default: the export's max length (or 512)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda (torch-2of4 needs cuda)"),
) -> None:
    """Greedy generation with one runtime (the same runners `bench` measures).

    Examples: losa-deploy generate runs/sparse70 --runtime deepsparse --prompt "The capital of France is"

      losa-deploy generate runs/sparse70 --runtime sparse-cpu --threads 2 --prompt "The capital of France is"
    """
    from ..runners import RUNTIMES, generate as run_generate, open_generation

    if runtime not in RUNTIMES:
        raise UserError(f"unknown --runtime '{runtime}': use one of {', '.join(RUNTIMES)}")
    runner, tok = open_generation(model_dir, runtime, prefill_len=prefill_len, max_len=max_len, threads=threads,
                                  device=device)
    t = time.perf_counter()
    res = run_generate(runner, tok, prompt, max_new_tokens)
    dt = time.perf_counter() - t
    out.print(prompt + res["text"], markup=False, highlight=False)
    err.print(f"[dim]{runner.name}: {len(res['tokens'])} new tokens in {dt:.2f} s ({runner.threads} threads)[/dim]")
