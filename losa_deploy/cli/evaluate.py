"""`losa-deploy evaluate` (perplexity / zero-shot) and `losa-deploy profiles list|show`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..console import out
from ..errors import UserError
from .app import app, profiles_app


@app.command()
def evaluate(
    model: str = typer.Argument("smollm2-135m", help="Hub id, local directory, .gguf file, or alias (smollm2-135m)."),
    data: Optional[str] = typer.Option(None, "--data", help="Perplexity text: file (.raw/.txt/.jsonl/.json/.parquet) or dataset name (wikitext2, c4). Default wikitext2 when no zero-shot task is asked for."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Window length in tokens (report it with every number)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Only the first K tokens of the joined text (whole windows)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", metavar="NAMES", help="Zero-shot tasks, comma list: local ones need --task-data; any other lm-evaluation-harness task name is fetched online."),
    task_data: Optional[list[str]] = typer.Option(None, "--task-data", metavar="NAME=PATH", help="NAME=PATH of a local task file in its original format (repeatable). NAME: piqa, arc_easy, arc_challenge, boolq, hellaswag, winogrande, openbookqa, rte."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Zero-shot: only the first N items of each task."),
    batch_size: int = typer.Option(8, "--batch-size", help="Zero-shot: requests per forward pass."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """Perplexity (WikiText-2 protocol: rows joined with blank lines, one tokenisation, non-overlapping windows) and/or
    zero-shot accuracy through lm-evaluation-harness.

    Examples: losa-deploy evaluate smollm2-135m --data ../shared/data/wikitext-2-raw/wiki.test.raw --seqlen 2048 --max-tokens 20480

    losa-deploy evaluate smollm2-135m --task-data piqa=../shared/data/piqa/valid.jsonl --limit 200 --json out.json
    """
    from ..atomic import write_json
    from ..cpu_gemm import cpu_gemm, resolve_cpu_gemm
    from ..models import load_model

    resolve_cpu_gemm()  # a bad LOSA_DEPLOY_CPU_GEMM fails before the model load
    zs_tasks: dict[str, str | None] = {}
    if tasks or task_data:
        from ..evaluation.zeroshot import parse_task_args

        zs_tasks = parse_task_args(tasks, task_data)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1 (got {limit})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {batch_size})")
    do_ppl = data is not None or not zs_tasks
    if do_ppl:
        if seqlen <= 1:
            raise UserError(f"--seqlen must be > 1 (got {seqlen})")
        if max_tokens is not None and max_tokens < seqlen:
            raise UserError(f"--max-tokens ({max_tokens}) must be at least one window (--seqlen {seqlen})")
    if zs_tasks:
        # Read and check every task file before the model load, so a typo fails in a second, not after it.
        from ..tasks.loaders import LOCAL_TASKS

        for name, path in zs_tasks.items():
            if path is not None:
                LOCAL_TASKS[name][0](path, 1)
    if json_path:
        from ..artifact import check_output_room

        check_output_room(json_path, 2**20, flag="--json")  # a read-only or full disk fails now, not after the run
    m, tok = load_model(model, dtype=dtype, device=device, tokenizer_check="error")
    _check_masks_of(model, m)
    d: dict = {"model": model}
    if do_ppl:
        from ..evaluation.perplexity import evaluate_perplexity

        data = data or "wikitext2"
        with cpu_gemm() as gemm:
            res = evaluate_perplexity(m, tok, data, seqlen, max_tokens=max_tokens)
        d |= {"data": data, **res.to_dict(), "cpu_gemm": gemm}
        out.print(
            f"perplexity [bold]{res.perplexity:.4f}[/bold]  (seqlen {res.seqlen}, {res.windows} windows, "
            f"{res.tokens_evaluated} of {res.tokens_total} tokens)"
        )
    if zs_tasks:
        import time

        from rich.table import Table

        from ..evaluation.zeroshot import evaluate_zeroshot

        t0 = time.perf_counter()
        with cpu_gemm():
            zs = evaluate_zeroshot(m, tok, zs_tasks, limit=limit, batch_size=batch_size)
        zs["seconds"] = round(time.perf_counter() - t0, 1)
        d["zeroshot"] = zs

        def pct(v: Optional[float]) -> str:
            return "-" if v is None else f"{100 * v:.2f}"

        t = Table("task", "n", "acc %", "± stderr", "acc_norm %", title=f"zero-shot ({zs['harness']}, {zs['seconds']} s)")
        for name, r in zs["tasks"].items():
            t.add_row(name, str(r["n"]), pct(r["acc"]), pct(r.get("acc_stderr")), pct(r.get("acc_norm")))
        t.add_row("[bold]average[/bold]", "", pct(zs["average"]["acc"]), "", pct(zs["average"].get("acc_norm")))
        out.print(t)
    if json_path:
        write_json(json_path, d)


def _check_masks_of(spec: str, model: object) -> None:
    """A local checkpoint's weights must agree with its sparsity_masks.safetensors (aliases and GGUF files are dense
    sources with no masks to check). Without masks only a compress output, which should have them, gets a note:
    evaluate is as often given a dense model."""
    from ..artifact import check_masks, has_manifest, named_weights

    p = Path(spec).expanduser()
    if p.is_dir():
        check_masks(p, named_weights(model), note=has_manifest(p))


@profiles_app.command("list")
def profiles_list() -> None:
    """List the known profiles."""
    from rich.table import Table

    from ..profiles import list_profiles, load_profile

    t = Table("profile", "description")
    for name in list_profiles():
        t.add_row(name, str(load_profile(name).get("description", "")))
    out.print(t)


@profiles_app.command("show")
def profiles_show(name: str = typer.Argument(..., help="Profile name or path to a .toml file.")) -> None:
    """Print a profile's settings."""
    from ..profiles import load_profile

    p = load_profile(name)
    out.print_json(json.dumps(p))
