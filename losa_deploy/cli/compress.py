"""`losa-deploy compress`: profile + flags -> `compress.Recipe` -> `compress.run_compress` -> summary table.

Each setting has one name: the parameter here, the flag (with dashes), the profile key and the recipe field.
"""

from __future__ import annotations

import json
from typing import Any, List, Optional

import typer

from ..console import out as stdout
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

_HELP = {
    "out": "Output directory (HF checkpoint + manifest + masks).",
    "model": "Hub id, local directory, .gguf, or alias \\[default: smollm2-135m].",
    "profile": "Named profile (losa-deploy profiles list) or .toml path; flags override it.",
    "method": "magnitude | wanda | sparsegpt | losa | dense-lora (naive baseline: prune, dense LoRA, merge, "
              "re-prune; takes the LoSA flags, rank = --rank-end) \\[default: wanda].",
    "pattern": "unstructured | N:M (N kept of M, e.g. 2:4) | mixed:M \\[default: unstructured].",
    "sparsity": "Mean target sparsity in [0, 1) \\[default: 0.5; fixed by N:M].",
    "allocation": "Layer-wise rates: uniform | atp | owl | rmi \\[default: uniform].",
    "atp_beta": "ATP step (number in the legal range) or 'auto' (grid search on held-out text).",
    "tune_data": "Text for ATP auto tuning \\[default: held-out windows of the calibration source].",
    "owl_m": "OWL outlier threshold M \\[default: 5].",
    "owl_lambda": "OWL rate spread lambda \\[default: 0.08].",
    "rmi_beta": "RMI importance temperature \\[default: 1].",
    "calib_data": "Calibration text: file (.txt/.raw/.jsonl/.json/.parquet), dataset name, several joined by commas, "
                  "or 'self' \\[default: self].",
    "nsamples": "Calibration sequences \\[default: 128].",
    "self_prompted": "Share of 'self' text that answers a request for a long piece of prose (the chat template's "
                     "user turn, a genre drawn per sequence) instead of continuing a random token \\[default: 0].",
    "seqlen": "Calibration sequence length in tokens \\[default: 512].",
    "seed": "Calibration sampling seed \\[default: 0].",
    "ignore": "fnmatch pattern over full weight names to keep dense (repeatable).",
    "type_offsets": "KIND=OFFSET: prune every block's linears of that kind (e.g. k_proj) at the block's rate plus "
                    "OFFSET; the other linears restore the block's rate (repeatable; unstructured only).",
    "eval_data": "Perplexity text measured before and after (e.g. wiki.test.raw).",
    "eval_seqlen": "Perplexity window \\[default: 2048].",
    "eval_max_tokens": "Only the first K tokens of the eval text.",
    "eval_before": "Also measure the dense model \\[default: yes].",
    "device": "cpu | cuda | auto \\[default: cpu].",
    "dtype": "float32 | bfloat16 | float16 \\[default: float32].",
    "calib_dtype": "Arithmetic of the calibration block forwards: float32 | bfloat16 | auto (bf16 where the "
                   "hardware has it) \\[default: float32]. Statistics and pruning math stay float32.",
    "offload": "Keep the model on CPU; only the current block on --device.",
    "overwrite": "Replace an existing --out directory.",
    "steps": "LoSA: pruning/fine-tuning steps T \\[default: 5].",
    "rank_start": "LoSA: mean adapter rank at the first step \\[default: 6].",
    "rank_end": "LoSA: mean adapter rank at the last step \\[default: 10].",
    "rank_cap": "LoSA: per-block maximum rank \\[default: 16].",
    "train_data": "LoSA: fine-tuning data (Alpaca JSON, text, several joined by commas, or 'self') \\[default: self].",
    "train_samples": "LoSA: fine-tuning samples over all steps \\[default: 256].",
    "objective": "LoSA: lm | distill (KL to the dense model) | squarehead (KL + every block's output) \\[default: lm].",
    "mask_method": "LoSA: wanda | sparsegpt \\[default: wanda].",
    "train_seqlen": "LoSA: fine-tuning sequence length in tokens \\[default: 256].",
    "batch_size": "LoSA: fine-tuning batch size \\[default: 4].",
    "lr": "LoSA: AdamW learning rate, one schedule over all steps \\[default: 2e-4].",
    "lr_schedule": "LoSA: linear (warmup, then decay over all steps) | wsd (warmup, hold, decay in the last step) "
                   "\\[default: linear].",
    "train_share_power": "LoSA: step t trains on a share of the samples proportional to S_t^p, S_t its sparsity "
                         "(0: equal shares) \\[default: 0].",
    "lora_alpha": "LoSA: adapter scale alpha (update = alpha/r * (B A) * M) \\[default: 16].",
    "lora_dropout": "LoSA: dropout on the adapter input \\[default: 0.1, the paper's]; 0 fuses adapter and weight "
                    "into one matmul (faster training).",
    "uniform_ranks": "LoSA ablation: same rank for every block \\[default: allocated by reconstruction error].",
    "resume": "LoSA: continue an interrupted run from its last finished step.",
    "json_out": "Print the manifest as JSON on stdout instead of the table.",
}
_NOT_SETTINGS = ("profile", "json_out")


def _option(name: str, off: str | None = None) -> Any:
    """The option for setting `name`: flag `--name-with-dashes` (a bool's `off` form after a slash), no default
    here (None: not given, so a profile's value or the recipe's default applies)."""
    flag = "--" + name.replace("_", "-")
    return typer.Option(None, f"{flag}/{off}" if off else flag, help=_HELP[name])


@app.command(epilog=_EXAMPLES)
def compress(
    out: Optional[str] = _option("out"),
    model: Optional[str] = _option("model"),
    profile: Optional[str] = _option("profile"),
    method: Optional[str] = _option("method"),
    pattern: Optional[str] = _option("pattern"),
    sparsity: Optional[float] = _option("sparsity"),
    allocation: Optional[str] = _option("allocation"),
    atp_beta: Optional[str] = _option("atp_beta"),
    tune_data: Optional[str] = _option("tune_data"),
    owl_m: Optional[float] = _option("owl_m"),
    owl_lambda: Optional[float] = _option("owl_lambda"),
    rmi_beta: Optional[float] = _option("rmi_beta"),
    calib_data: Optional[str] = _option("calib_data"),
    nsamples: Optional[int] = _option("nsamples"),
    seqlen: Optional[int] = _option("seqlen"),
    seed: Optional[int] = _option("seed"),
    self_prompted: Optional[float] = _option("self_prompted"),
    ignore: Optional[List[str]] = _option("ignore"),
    type_offsets: Optional[List[str]] = typer.Option(None, "--type-offset", help=_HELP["type_offsets"]),
    eval_data: Optional[str] = _option("eval_data"),
    eval_seqlen: Optional[int] = _option("eval_seqlen"),
    eval_max_tokens: Optional[int] = _option("eval_max_tokens"),
    eval_before: Optional[bool] = _option("eval_before", off="--no-eval-before"),
    device: Optional[str] = _option("device"),
    dtype: Optional[str] = _option("dtype"),
    calib_dtype: Optional[str] = _option("calib_dtype"),
    offload: Optional[bool] = _option("offload", off="--no-offload"),
    overwrite: Optional[bool] = _option("overwrite"),
    steps: Optional[int] = _option("steps"),
    rank_start: Optional[int] = _option("rank_start"),
    rank_end: Optional[int] = _option("rank_end"),
    rank_cap: Optional[int] = _option("rank_cap"),
    train_data: Optional[str] = _option("train_data"),
    train_samples: Optional[int] = _option("train_samples"),
    objective: Optional[str] = _option("objective"),
    mask_method: Optional[str] = _option("mask_method"),
    train_seqlen: Optional[int] = _option("train_seqlen"),
    batch_size: Optional[int] = _option("batch_size"),
    lr: Optional[float] = _option("lr"),
    lr_schedule: Optional[str] = _option("lr_schedule"),
    train_share_power: Optional[float] = _option("train_share_power"),
    lora_alpha: Optional[float] = _option("lora_alpha"),
    lora_dropout: Optional[float] = _option("lora_dropout"),
    uniform_ranks: Optional[bool] = _option("uniform_ranks", off="--allocated-ranks"),
    resume: Optional[bool] = _option("resume"),
    json_out: bool = typer.Option(False, "--json", help=_HELP["json_out"]),
) -> None:
    """Prune a dense causal LM block by block (Wanda / SparseGPT / magnitude, or LoSA) and save a sparse HF
    checkpoint."""
    given = dict(locals())  # every parameter is a setting under its one name, but these two
    flags = {k: v for k, v in given.items() if k not in _NOT_SETTINGS}
    from ..compress import Recipe, command_line, run_compress
    from ..profiles import load_profile

    flags["ignore"] = list(ignore) if ignore else None
    flags["type_offsets"] = list(type_offsets) if type_offsets else None
    prof = load_profile(profile) if profile else None
    recipe = Recipe.from_profile(prof, flags)
    manifest = run_compress(recipe, progress=not json_out, command=command_line(),
                            profile=prof.get("name") if prof else None)
    if json_out:
        stdout.print_json(json.dumps(manifest, default=str))
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
    stdout.print(t)
    sp = man["sparsity"]
    stdout.print(f"sparsity: target {sp['target']:.4f}, realised {sp['realised_pruned_linears']:.4f} of pruned "
                 f"linears ({sp['realised_all_parameters']:.4f} of all parameters)")
    ev = man.get("eval") or {}
    if ev.get("after"):
        before = f"{ev['before']['perplexity']:.4f} -> " if ev.get("before") else ""
        after = ev["after"]["perplexity"]
        stdout.print(f"perplexity ({ev['data']}, seqlen {ev['seqlen']}): {before}[bold]{after:.4f}[/bold]")
    tm = man["timings"]
    stdout.print(f"time: {tm['total_s']:.1f} s total, prune {tm.get('prune_s', tm.get('losa_s', 0.0)):.1f} s; "
                 f"peak RSS {man['memory']['peak_rss_mb']:.0f} MB")
    a = man.get("allocation") or {}
    if a.get("tuning"):
        grid = ", ".join(f"{g['beta']:.4f}: {g['tune_ppl']:.2f}" for g in a["tuning"]["grid"])
        stdout.print(f"ATP beta chosen by tuning perplexity: {a['tuning']['chosen']:.5f} (beta: tuning ppl {grid})")
    for w in man.get("warnings") or []:
        stdout.print(f"[yellow]warning:[/yellow] {w}")
