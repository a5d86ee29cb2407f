"""`losa-deploy bench`: latency per runtime and phase + accuracy, sparse vs dense, as report.json/md and plots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from .app import app


@app.command()
def bench(
    sparse_dir: Optional[Path] = typer.Argument(
        None, help="The compressed model directory (output of 'compress'; 'export' output reused)."),
    baseline: Optional[str] = typer.Option(
        None, "--baseline", help="The dense model it came from: directory or alias (smollm2-135m)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report directory (default: <SPARSE_DIR>/bench)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the report in an existing --out (its cached exports are reused)."),
    runtimes: Optional[str] = typer.Option(
        None, "--runtimes", help="Comma list of torch,onnxruntime,deepsparse,sparse-cpu,torch-cuda,torch-2of4; "
        "NAME:dense or NAME:sparse times only that model on it. Default: all installed "
        "(missing ones skipped with a note); a requested missing one is an error."),
    prompt_lens: str = typer.Option("128,512", "--prompt-lens", help="Prefill prompt lengths (tokens)."),
    decode_past: int = typer.Option(256, "--decode-past", help="Tokens already in the cache when decode is timed."),
    decode_tokens: int = typer.Option(64, "--decode-tokens", help="Decode steps timed per repeat."),
    gen_tokens: Optional[int] = typer.Option(
        None, "--gen-tokens", help="End-to-end generation length after the first prompt (default: --decode-tokens)."),
    batch: int = typer.Option(1, "--batch", help="Batch size (the runners time batch 1)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads for every runtime, dense and sparse "
                                          "alike (default: all available cores)."),
    warmup: int = typer.Option(2, "--warmup", help="Discarded runs before measuring each phase."),
    repeats: int = typer.Option(5, "--repeats", help="Measured runs per phase (median and p90 reported)."),
    ppl_data: Optional[str] = typer.Option(
        None, "--ppl-data", help="Perplexity text file (e.g. wikitext-2-raw/wiki.test.raw); omitted: no perplexity."),
    ppl_seqlen: int = typer.Option(2048, "--ppl-seqlen", help="Perplexity window length."),
    ppl_max_tokens: Optional[int] = typer.Option(None, "--ppl-max-tokens",
                                                 help="Only the first K tokens (whole windows)."),
    task_data: List[str] = typer.Option(
        [], "--task-data", help="Zero-shot task from a local file, NAME=PATH (repeatable): piqa, arc_easy, "
        "arc_challenge, boolq, hellaswag, winogrande, openbookqa, rte."),
    tasks: Optional[str] = typer.Option(
        None, "--tasks", help="Comma list of lm-evaluation-harness task names (needs internet)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N items per zero-shot task."),
    shapes: Optional[str] = typer.Option(
        None, "--shapes", help="Also time K synthetic blocks with these shapes (llama-2-7b)."),
    blocks: int = typer.Option(2, "--blocks", help="Number of synthetic blocks for --shapes (~0.8 GB fp32 each)."),
    sparsity: Optional[float] = typer.Option(
        None, "--sparsity", help="Sparsity of the synthetic blocks (default: the sparse model's per-linear rates)."),
    shapes_only: bool = typer.Option(False, "--shapes-only", help="With --shapes: skip timing the real model."),
    compare: List[Path] = typer.Option(
        [], "--compare", help="Merge these report.json files (repeatable, or comma-separated) into one table."),
    skip_accuracy: bool = typer.Option(False, "--skip-accuracy", help="Do not measure perplexity / zero-shot."),
    skip_latency: bool = typer.Option(False, "--skip-latency", help="Do not time anything."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt token ids and synthetic weights."),
) -> None:
    """Time the sparse model against its dense baseline on each runtime (same graph, threads, shapes) and measure
    accuracy.

    Examples:

      losa-deploy bench runs/sparse70 --baseline smollm2-135m --runtimes onnxruntime,deepsparse --threads 2
      --ppl-data wiki.test.raw

      losa-deploy bench runs/sparse70 --baseline smollm2-135m --shapes llama-2-7b --blocks 2 --shapes-only
      --skip-accuracy --runtimes onnxruntime:dense,sparse-cpu

      losa-deploy bench --compare runs/s50/bench/report.json --compare runs/s70/bench/report.json --out runs/compare
    """
    from ..bench import run as B
    from ..console import out as console

    cmp_paths = [Path(p) for c in compare for p in str(c).split(",") if p]
    if sparse_dir is None:
        if not cmp_paths:
            raise UserError("give SPARSE_DIR and --baseline, or --compare REPORT.json ... "
                            "(see losa-deploy bench --help)")
        _, paths = B.run_compare(cmp_paths, out)
        if paths:
            console.print(f"comparison: {paths['md']}")
        return
    opts = B.BenchOptions(
        sparse_dir=sparse_dir, baseline=baseline, out=out or (sparse_dir / "bench"),
        runtimes=B.parse_runtimes(runtimes), prompt_lens=B.parse_int_list(prompt_lens, "--prompt-lens"),
        decode_past=decode_past, decode_tokens=decode_tokens,
        gen_tokens=decode_tokens if gen_tokens is None else gen_tokens,
        batch=batch, threads=threads, warmup=warmup, repeats=repeats,
        ppl_data=ppl_data, ppl_seqlen=ppl_seqlen, ppl_max_tokens=ppl_max_tokens,
        task_data=B.parse_tasks(tasks, task_data), limit=limit,
        shapes=shapes, blocks=blocks, sparsity=sparsity, skip_model_latency=shapes_only,
        skip_accuracy=skip_accuracy, skip_latency=skip_latency, seed=seed, command=sys.argv, overwrite=overwrite,
    )
    if shapes_only and not shapes:
        raise UserError("--shapes-only needs --shapes llama-2-7b")
    rep, paths = B.run_bench(opts)
    if cmp_paths:
        _, cpaths = B.run_compare(cmp_paths, opts.out, extra=[(Path(opts.out).name, rep)])
        console.print(f"comparison: {cpaths['md']}")
    console.print(f"report: {paths['json']}")
