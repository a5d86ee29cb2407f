"""`losa-deploy export`: a thin command over exporters/ (one exporter per --format)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..console import out
from ..errors import UserError
from .app import app

FORMATS = ("onnx", "deepsparse", "tensorrt", "compressed-tensors", "sparse-cpu")
ALIASES = {"hf": "compressed-tensors"}  # the Hugging Face sparse checkpoint is compressed-tensors


@app.command()
def export(
    model_dir: Path = typer.Argument(
        ..., help="A Hugging Face causal-LM directory (what `compress` writes, or any HF checkpoint)."),
    fmt: str = typer.Option(
        ..., "--format", "-f", help="onnx | deepsparse | tensorrt | compressed-tensors (alias hf) | sparse-cpu"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: MODEL_DIR/<format>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    prefill_len: int = typer.Option(128, "--prefill-len", help="deepsparse, sparse-cpu: tokens per prefill call."),
    max_len: int = typer.Option(
        512, "--max-len", help="deepsparse, sparse-cpu: total sequence length (prompt + generated)."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="deepsparse, sparse-cpu: verification threads (default: all)."),
    force_2of4: bool = typer.Option(
        False, "--force-2of4", help="tensorrt: re-prune a non-2:4 checkpoint to 2:4 by magnitude."),
) -> None:
    """Export a (sparse) model and verify it against PyTorch before declaring it done.

    Examples:

      losa-deploy export runs/sparse70 --format deepsparse --prefill-len 128 --max-len 512

      losa-deploy export runs/sparse70 --format onnx

      losa-deploy export runs/gpu24 --format tensorrt

      losa-deploy export runs/sparse70 --format compressed-tensors

      losa-deploy export runs/sparse70 --format sparse-cpu
    """
    from ..artifact import EXPORT_MANIFEST_NAME, check_output_room, checkpoint_bytes, remove_stale_partials

    fmt = fmt.lower().strip()
    fmt = ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise UserError(f"unknown --format '{fmt}': use one of {', '.join(FORMATS)} (hf = compressed-tensors)")
    from exporters.common import check_model_dir

    src = check_model_dir(model_dir)
    dest = out_dir if out_dir is not None else src / fmt
    if dest.exists() and not overwrite:
        raise UserError(f"output '{dest}' already exists; pass --overwrite or choose another --out")
    remove_stale_partials(dest)
    # Before the model is loaded: the export holds about the weights once more (fp16 for tensorrt).
    check_output_room(dest, checkpoint_bytes(src, 2 if fmt == "tensorrt" else 4) + 16 * 2**20)
    t = time.perf_counter()
    man = _run_exporter(fmt, src, dest, overwrite=overwrite, prefill_len=prefill_len, max_len=max_len,
                        threads=threads, force_2of4=force_2of4)
    for line in _summary(fmt, man):
        out.print(line, highlight=False)
    out.print(f"wrote {dest} in {time.perf_counter() - t:.1f} s (manifest: {dest / EXPORT_MANIFEST_NAME})")


def _run_exporter(fmt: str, src: Path, dest: Path, *, overwrite: bool, prefill_len: int, max_len: int,
                  threads: Optional[int], force_2of4: bool) -> dict:
    """The one exporter for `fmt` (imported only when chosen: each pulls in its own heavy dependencies)."""
    if fmt == "onnx":
        from exporters.onnx_export import export_onnx

        return export_onnx(src, dest, overwrite=overwrite)
    if fmt == "deepsparse":
        from exporters.deepsparse_export import export_deepsparse

        return export_deepsparse(src, dest, prefill_len=prefill_len, max_len=max_len, overwrite=overwrite,
                                 threads=threads)
    if fmt == "tensorrt":
        from exporters.tensorrt_export import export_tensorrt

        return export_tensorrt(src, dest, force_2of4=force_2of4, overwrite=overwrite)
    if fmt == "sparse-cpu":
        from exporters.sparse_cpu_export import export_sparse_cpu

        return export_sparse_cpu(src, dest, prefill_len=prefill_len, max_len=max_len, overwrite=overwrite,
                                 threads=threads)
    from exporters.compressed_tensors_export import export_compressed_tensors

    return export_compressed_tensors(src, dest, overwrite=overwrite)


def _summary(fmt: str, man: dict) -> list[str]:
    """What the export verified, in a few lines (Rich markup)."""
    if fmt == "onnx":
        v = man["verification"]["onnxruntime_vs_torch"]
        return [f"onnx export verified: max |dlogit| {v['max_abs_logit_diff']:.2e} (tol {v['logit_tolerance']:g}), "
                f"{v['new_tokens']} greedy tokens match: {v['tokens_match']}, zero patterns kept: "
                f"{man['verification']['zero_pattern']['ok']}"]
    if fmt == "deepsparse":
        v, ds = man["verification"], man["deepsparse"]
        return [f"deepsparse export verified: ORT max |dlogit| "
                f"{v['onnxruntime_vs_torch']['max_abs_logit_diff']:.2e}; "
                f"DeepSparse {v['deepsparse_vs_torch']['new_tokens']} greedy tokens match PyTorch "
                f"(max |dlogit| {v['deepsparse_vs_torch']['max_abs_logit_diff']:.2e}); supported ops "
                f"{ds['fraction_of_supported_ops']}; sparse layers {len(ds['sparse_layers'])}/"
                f"{len(ds['sparse_layers']) + len(ds['dense_layers'])}"]
    if fmt == "tensorrt":
        r = man["two_four"]["summary"]
        lines = [f"tensorrt fp16 ONNX written; 2:4 eligible {r['eligible']}, ineligible {r['ineligible']}, "
                 f"skipped {r['skipped']}"]
        if man.get("forced_2of4"):
            lines.append(f"[yellow]re-pruned {man['forced_2of4']['layers']} layers to 2:4 by magnitude "
                         "(--force-2of4)[/yellow]")
        return lines + [f"build the sparse engine with:\n  {man['trtexec']}"]
    if fmt == "sparse-cpu":
        v, s = man["verification"]["sparse_cpu_vs_torch"], man["sizes"]
        return [f"sparse-cpu export verified: max |dlogit| {v['max_abs_logit_diff']:.2e} "
                f"(tol {v['logit_tolerance']:g}), "
                f"{v['new_tokens']} greedy tokens match: {v['tokens_match']}, zero patterns kept: "
                f"{man['verification']['zero_pattern']['ok']}; weights {s['weight_bytes'] / 1e6:.1f} MB = "
                f"{s['ratio']:.3f}x dense fp32 (block linears {s['block_linears_ratio']:.3f}x)"
                ] + [f"[yellow]note: {note}[/yellow]" for note in man["notes"]]
    s, sc = man["sizes"], man["sparsity_config"]
    return [f"compressed-tensors {sc['format']} ({sc['sparsity_structure']}, {man['compressed_layers']} layers "
            f"compressed): {s['compressed_bytes'] / 1e6:.1f} MB vs dense {s['dense_bytes'] / 1e6:.1f} MB "
            f"({s['ratio'] * 100:.1f}%); decompressed exactly: {man['verification']['decompressed_exact']}",
            f"load with: {man['load']}"]
