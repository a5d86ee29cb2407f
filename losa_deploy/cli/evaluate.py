"""`losa-deploy evaluate`: perplexity and/or zero-shot accuracy; the work is in losa_deploy.evaluation.run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..console import out
from .app import app


@app.command()
def evaluate(
    model: str = typer.Argument("smollm2-135m", help="Hub id, local directory, .gguf file, or alias (smollm2-135m)."),
    data: Optional[str] = typer.Option(
        None, "--data", help="Perplexity text: file (.raw/.txt/.jsonl/.json/.parquet) or dataset name (wikitext2, c4). "
        "Default wikitext2 when no zero-shot task is asked for."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Window length in tokens (report it with every number)."),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", help="Only the first K tokens of the joined text (whole windows)."),
    tasks: Optional[str] = typer.Option(
        None, "--tasks", metavar="NAMES", help="Zero-shot tasks, comma list: local ones need --task-data; any other "
        "lm-evaluation-harness task name is fetched online."),
    task_data: Optional[list[str]] = typer.Option(
        None, "--task-data", metavar="NAME=PATH", help="NAME=PATH of a local task file in its original format "
        "(repeatable). NAME: piqa, arc_easy, arc_challenge, boolq, hellaswag, winogrande, openbookqa, rte."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Zero-shot: only the first N items of each task."),
    batch_size: int = typer.Option(8, "--batch-size", help="Zero-shot: requests per forward pass."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """Perplexity (WikiText-2 protocol: rows joined with blank lines, one tokenisation, non-overlapping windows) and/or
    zero-shot accuracy through lm-evaluation-harness.

    Examples: losa-deploy evaluate smollm2-135m --data ../shared/data/wikitext-2-raw/wiki.test.raw --seqlen 2048
    --max-tokens 20480

    losa-deploy evaluate smollm2-135m --task-data piqa=../shared/data/piqa/valid.jsonl --limit 200 --json out.json
    """
    from ..atomic import write_json
    from ..evaluation.run import check_request, load_checked_model, perplexity_entry, zeroshot_entry

    req = check_request(data, seqlen, max_tokens, tasks, task_data, limit, batch_size)
    if json_path:
        from ..artifact import check_output_room

        check_output_room(json_path, 2**20, flag="--json")  # a read-only or full disk fails now, not after the run
    m, tok = load_checked_model(model, dtype, device)
    d: dict = {"model": model}
    if req.perplexity:
        d |= perplexity_entry(m, tok, req)
        out.print(
            f"perplexity [bold]{d['perplexity']:.4f}[/bold]  (seqlen {d['seqlen']}, {d['windows']} windows, "
            f"{d['tokens_evaluated']} of {d['tokens_total']} tokens)"
        )
    if req.tasks:
        d["zeroshot"] = zs = zeroshot_entry(m, tok, req)
        _print_zeroshot(zs)
    if json_path:
        write_json(json_path, d)


def _print_zeroshot(zs: dict) -> None:
    from rich.table import Table

    def pct(v: Optional[float]) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    t = Table("task", "n", "acc %", "± stderr", "acc_norm %", title=f"zero-shot ({zs['harness']}, {zs['seconds']} s)")
    for name, r in zs["tasks"].items():
        t.add_row(name, str(r["n"]), pct(r["acc"]), pct(r.get("acc_stderr")), pct(r.get("acc_norm")))
    t.add_row("[bold]average[/bold]", "", pct(zs["average"]["acc"]), "", pct(zs["average"].get("acc_norm")))
    out.print(t)
