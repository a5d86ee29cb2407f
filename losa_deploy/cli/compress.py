"""`losa-deploy compress`: profile + flags -> `compress.Recipe` -> `compress.run_compress` -> summary table."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from ..console import out
from .app import app

_EXAMPLES = "\n\n".join([
    "[bold]Examples:[/bold]",
    "  losa-deploy compress --profile cpu-70pct --out runs/sparse70",
    "  losa-deploy compress --method wanda --sparsity 0.5 --calib-data c4.jsonl --nsamples 128 --seqlen 512"
    " --eval-data wiki.test.raw --out runs/wanda50",
    "  losa-deploy compress --method sparsegpt --pattern 2:4 --ignore '*.down_proj.weight' --out runs/sgpt24",
    "  losa-deploy compress --method wanda --sparsity 0.7 --allocation atp --atp-beta auto --out runs/atp70",
    "  losa-deploy compress --method wanda --pattern mixed:8 --sparsity 0.75 --allocation owl --out runs/mixed28",
])


@app.command(epilog=_EXAMPLES)
def compress(
    out_dir: Optional[str] = typer.Option(None, "--out", help="Output directory (HF checkpoint + manifest + masks)."),
    model: Optional[str] = typer.Option(
        None, "--model",
        help="Hub id, local directory, .gguf, or alias \\[default: smollm2-135m]."
    ),
    profile: Optional[str] = typer.Option(
        None, "--profile",
        help="Named profile (losa-deploy profiles list) or .toml path; flags override it."
    ),
    method: Optional[str] = typer.Option(
        None, "--method",
        help="magnitude | wanda | sparsegpt | losa | dense-lora (naive baseline: prune, dense LoRA, merge, "
        "re-prune; takes the LoSA flags, rank = --rank-end) \\[default: wanda]."
    ),
    pattern: Optional[str] = typer.Option(
        None, "--pattern",
        help="unstructured | N:M (N kept of M, e.g. 2:4) | mixed:M \\[default: unstructured]."
    ),
    sparsity: Optional[float] = typer.Option(
        None, "--sparsity",
        help="Mean target sparsity in [0, 1) \\[default: 0.5; fixed by N:M]."
    ),
    allocation: Optional[str] = typer.Option(
        None, "--allocation",
        help="Layer-wise rates: uniform | atp | owl | rmi \\[default: uniform]."
    ),
    atp_beta: Optional[str] = typer.Option(
        None, "--atp-beta",
        help="ATP step (number in the legal range) or 'auto' (grid search on held-out text)."
    ),
    tune_data: Optional[str] = typer.Option(
        None, "--tune-data",
        help="Text for ATP auto tuning \\[default: held-out windows of the calibration source]."
    ),
    owl_m: Optional[float] = typer.Option(None, "--owl-m", help="OWL outlier threshold M \\[default: 5]."),
    owl_lambda: Optional[float] = typer.Option(None, "--owl-lambda", help="OWL rate spread lambda \\[default: 0.08]."),
    rmi_beta: Optional[float] = typer.Option(None, "--rmi-beta", help="RMI importance temperature \\[default: 1]."),
    calib_data: Optional[str] = typer.Option(
        None, "--calib-data",
        help="Calibration text: file (.txt/.raw/.jsonl/.json/.parquet), dataset name, or 'self' \\[default: "
        "self]."
    ),
    nsamples: Optional[int] = typer.Option(None, "--nsamples", help="Calibration sequences \\[default: 128]."),
    seqlen: Optional[int] = typer.Option(
        None, "--seqlen",
        help="Calibration sequence length in tokens \\[default: 512]."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Calibration sampling seed \\[default: 0]."),
    ignore: Optional[List[str]] = typer.Option(
        None, "--ignore",
        help="fnmatch pattern over full weight names to keep dense (repeatable)."
    ),
    eval_data: Optional[str] = typer.Option(
        None, "--eval-data",
        help="Perplexity text measured before and after (e.g. wiki.test.raw)."
    ),
    eval_seqlen: Optional[int] = typer.Option(None, "--eval-seqlen", help="Perplexity window \\[default: 2048]."),
    eval_max_tokens: Optional[int] = typer.Option(
        None, "--eval-max-tokens",
        help="Only the first K tokens of the eval text."
    ),
    eval_before: Optional[bool] = typer.Option(
        None, "--eval-before/--no-eval-before",
        help="Also measure the dense model \\[default: yes]."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | auto \\[default: cpu]."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 \\[default: float32]."),
    calib_dtype: Optional[str] = typer.Option(
        None, "--calib-dtype",
        help="Arithmetic of the calibration block forwards: float32 | bfloat16 | auto (bf16 where the hardware "
        "has it) \\[default: float32]. Statistics and pruning math stay float32.",
    ),
    offload: Optional[bool] = typer.Option(
        None, "--offload/--no-offload",
        help="Keep the model on CPU; only the current block on --device."
    ),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing --out directory."),
    steps: Optional[int] = typer.Option(None, "--steps", help="LoSA: pruning/fine-tuning steps T \\[default: 5]."),
    rank_start: Optional[int] = typer.Option(
        None, "--rank-start",
        help="LoSA: mean adapter rank at the first step \\[default: 6]."
    ),
    rank_end: Optional[int] = typer.Option(
        None, "--rank-end",
        help="LoSA: mean adapter rank at the last step \\[default: 10]."
    ),
    rank_cap: Optional[int] = typer.Option(None, "--rank-cap", help="LoSA: per-block maximum rank \\[default: 16]."),
    train_data: Optional[str] = typer.Option(
        None, "--train-data",
        help="LoSA: fine-tuning data (Alpaca JSON, text, or 'self') \\[default: self]."
    ),
    train_samples: Optional[int] = typer.Option(
        None, "--train-samples",
        help="LoSA: fine-tuning samples over all steps \\[default: 256]."
    ),
    objective: Optional[str] = typer.Option(None, "--objective", help="LoSA: lm | distill \\[default: lm]."),
    mask_method: Optional[str] = typer.Option(
        None, "--mask-method",
        help="LoSA: wanda | sparsegpt \\[default: wanda]."
    ),
    train_seqlen: Optional[int] = typer.Option(
        None, "--train-seqlen",
        help="LoSA: fine-tuning sequence length in tokens \\[default: 256]."
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size",
        help="LoSA: fine-tuning batch size \\[default: 4]."
    ),
    lr: Optional[float] = typer.Option(
        None, "--lr",
        help="LoSA: AdamW learning rate, one schedule over all steps \\[default: 2e-4]."
    ),
    lora_alpha: Optional[float] = typer.Option(
        None, "--lora-alpha",
        help="LoSA: adapter scale alpha (update = alpha/r * (B A) * M) \\[default: 16]."
    ),
    lora_dropout: Optional[float] = typer.Option(
        None, "--lora-dropout",
        help="LoSA: dropout on the adapter input \\[default: 0.1, the paper's]; 0 fuses adapter and weight "
        "into one matmul (faster training)."
    ),
    uniform_ranks: Optional[bool] = typer.Option(
        None, "--uniform-ranks/--allocated-ranks",
        help="LoSA ablation: same rank for every block \\[default: allocated by reconstruction error]."
    ),
    resume: Optional[bool] = typer.Option(
        None, "--resume",
        help="LoSA: continue an interrupted run from its last finished step."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout instead of the table."),
) -> None:
    """Prune a dense causal LM block by block (Wanda / SparseGPT / magnitude, or LoSA) and save a sparse HF
    checkpoint."""
    from ..compress import Recipe, command_line, run_compress
    from ..profiles import load_profile

    prof = load_profile(profile) if profile else None
    flags = {  # each flag under its one name: the profile key and the recipe field are the same word
        "out": out_dir, "model": model, "method": method, "pattern": pattern, "sparsity": sparsity,
        "allocation": allocation, "atp_beta": atp_beta, "tune_data": tune_data, "owl_m": owl_m,
        "owl_lambda": owl_lambda, "rmi_beta": rmi_beta, "calib_data": calib_data, "nsamples": nsamples,
        "seqlen": seqlen, "seed": seed, "ignore": list(ignore) if ignore else None, "eval_data": eval_data,
        "eval_seqlen": eval_seqlen, "eval_max_tokens": eval_max_tokens, "eval_before": eval_before,
        "device": device, "dtype": dtype, "calib_dtype": calib_dtype, "offload": offload, "overwrite": overwrite,
        "steps": steps, "rank_start": rank_start, "rank_end": rank_end, "rank_cap": rank_cap,
        "train_data": train_data, "train_samples": train_samples, "objective": objective,
        "mask_method": mask_method, "resume": resume, "train_seqlen": train_seqlen, "batch_size": batch_size,
        "lr": lr, "uniform_ranks": uniform_ranks, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
    }
    recipe = Recipe.from_profile(prof, flags)
    manifest = run_compress(recipe, progress=not json_out, command=command_line(),
                            profile=prof.get("name") if prof else None)
    if json_out:
        out.print_json(json.dumps(manifest, default=str))
        return
    _print_summary(manifest)


def _print_summary(man: dict) -> None:
    from rich.table import Table

    r = man["recipe"]
    t = Table(title=f"{r['method']} {r['pattern']} -> {r['out']}", show_lines=False)
    t.add_column("block", justify="right")
    t.add_column("target", justify="right")
    t.add_column("realised", justify="right")
    has_nm = any("n_m" in b for b in man["blocks"])
    has_rank = any("rank" in b for b in man["blocks"])
    if has_nm:
        t.add_column("N:M", justify="right")
    if has_rank:
        t.add_column("rank", justify="right")
    for b in man["blocks"]:
        row = [str(b["index"]), f"{b['rate']:.4f}", f"{b.get('realised', float('nan')):.4f}"]
        if has_nm:
            row.append(b.get("n_m", ""))
        if has_rank:
            row.append(str(b.get("rank", "")))
        t.add_row(*row)
    out.print(t)
    sp = man["sparsity"]
    out.print(f"sparsity: target {sp['target']:.4f}, realised {sp['realised_pruned_linears']:.4f} of pruned linears "
              f"({sp['realised_all_parameters']:.4f} of all parameters)")
    ev = man.get("eval") or {}
    if ev.get("after"):
        before = f"{ev['before']['perplexity']:.4f} -> " if ev.get("before") else ""
        after = ev["after"]["perplexity"]
        out.print(f"perplexity ({ev['data']}, seqlen {ev['seqlen']}): {before}[bold]{after:.4f}[/bold]")
    tm = man["timings"]
    out.print(f"time: {tm['total_s']:.1f} s total, prune {tm.get('prune_s', tm.get('losa_s', 0.0)):.1f} s; "
              f"peak RSS {man['memory']['peak_rss_mb']:.0f} MB")
    a = man.get("allocation") or {}
    if a.get("tuning"):
        grid = ", ".join(f"{g['beta']:.4f}: {g['tune_ppl']:.2f}" for g in a["tuning"]["grid"])
        out.print(f"ATP beta chosen by tuning perplexity: {a['tuning']['chosen']:.5f} (beta: tuning ppl {grid})")
    for w in man.get("warnings") or []:
        out.print(f"[yellow]warning:[/yellow] {w}")
