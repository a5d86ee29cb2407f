"""`bench`: latency (per runtime and phase) and accuracy of a sparse model against its dense baseline, as a report.

`run_bench(BenchOptions)` does the work; `losa_deploy/cli/bench.py` only parses flags. Fairness rules:
- dense and sparse run through the same runtime, graph format (the DeepSparse-contract fixed-shape model.onnx),
  threads, prompt lengths and token ids;
- ONNX Runtime is the dense CPU baseline (no sparse kernels); DeepSparse runs the sparse model (and the dense one too);
- phases, warm-up and repeats: see `latency.py`; bounds: `bounds.py`; schema: docs/report_schema.md.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..artifact import MASKS_NAME, has_export_manifest, read_export_manifest
from ..errors import UserError

CPU_RUNTIMES = ("torch", "onnxruntime", "deepsparse", "sparse-cpu")
GPU_RUNTIMES = ("torch-cuda", "torch-2of4")
ALL_RUNTIMES = CPU_RUNTIMES + GPU_RUNTIMES
ONNX_RUNTIMES = ("onnxruntime", "deepsparse")  # run the exported deepsparse-format model.onnx
_REQUIRES = {"onnxruntime": "onnxruntime", "deepsparse": "deepsparse", "torch": "torch", "torch-cuda": "torch",
             "torch-2of4": "torch", "sparse-cpu": "losa_deploy.sparse_cpu"}
SPARSE_CPU = "sparse-cpu"  # our own sparse CPU runtime (losa_deploy/sparse_cpu): packed export dir `<model>/sparse-cpu`


@dataclass
class BenchOptions:
    sparse_dir: Path | None
    baseline: str | None
    out: Path
    runtimes: Sequence[str] | None = None  # None: every available one (not-installed ones skipped with a note)
    prompt_lens: Sequence[int] = (128, 512)
    decode_past: int = 256
    decode_tokens: int = 64
    gen_tokens: int = 64
    batch: int = 1
    threads: int | None = None
    warmup: int = 2
    repeats: int = 5
    ppl_data: str | None = None
    ppl_seqlen: int = 2048
    ppl_max_tokens: int | None = None
    task_data: dict[str, str | None] = field(default_factory=dict)  # {task: local path, or None for a harness task}
    tasks: Sequence[str] = ()
    limit: int | None = None
    shapes: str | None = None
    blocks: int = 2
    sparsity: float | None = None
    compare: Sequence[Path] = ()
    skip_accuracy: bool = False
    skip_latency: bool = False
    skip_model_latency: bool = False  # with --shapes: time only the synthetic blocks
    seed: int = 0
    command: Sequence[str] | None = None
    progress: bool = True
    overwrite: bool = False  # replace the report files of an existing --out (its cached exports are reused)


# ---- validation -------------------------------------------------------------------------------------------------

def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, e.g. 128,512 (got '{text}')")
    if not vals or any(v < 1 for v in vals):
        raise UserError(f"{flag} needs positive integers (got '{text}')")
    return vals


VARIANTS = ("dense", "sparse")


def parse_runtimes(text: str | None) -> list[str] | None:
    """Runtime names, each optionally limited to one model: `onnxruntime:dense` times only the dense model on ONNX
    Runtime (saves memory and time where its sparse run is not needed, e.g. 7B shapes)."""
    if text is None:
        return None
    rts = [x.strip() for x in text.split(",") if x.strip()]
    bad = [r for r in rts if r.partition(":")[0] not in ALL_RUNTIMES]
    if bad or not rts:
        raise UserError(f"unknown runtime '{','.join(bad) or text}': choose from {', '.join(ALL_RUNTIMES)}")
    badv = [r for r in rts if ":" in r and r.partition(":")[2] not in VARIANTS]
    if badv:
        raise UserError(f"'{badv[0]}': a runtime may be limited to one model with :dense or :sparse")
    return list(dict.fromkeys(rts))


def split_variants(rts: Sequence[str] | None) -> tuple[list[str] | None, dict[str, tuple[str, ...]]]:
    """(runtime names, {runtime: variants to time}) from parse_runtimes' list; a bare name times both models."""
    if rts is None:
        return None, {}
    names: list[str] = []
    var: dict[str, set[str]] = {}
    for r in rts:
        name, _, v = r.partition(":")
        if name not in names:
            names.append(name)
        var.setdefault(name, set()).update([v] if v else VARIANTS)
    return names, {k: tuple(x for x in VARIANTS if x in v) for k, v in var.items()}


def parse_tasks(tasks: str | None, task_data: Sequence[str]) -> dict[str, str | None]:
    """{task: local path or None (harness task)}, via the zero-shot module's parser; local files must exist."""
    from ..evaluation.zeroshot import parse_task_args

    out = parse_task_args(tasks, list(task_data))
    for name, path in out.items():
        if path is not None and not Path(path).exists():
            raise UserError(f"--task-data {name}: '{path}' not found")
    return out


_GEOMETRY = {"hidden": ("hidden_size", "n_embd", "d_model"), "layers": ("num_hidden_layers", "n_layer"),
             "heads": ("num_attention_heads", "n_head"), "kv_heads": ("num_key_value_heads",),
             "intermediate": ("intermediate_size", "n_inner", "ffn_dim"), "vocab": ("vocab_size",)}


def architecture(cfg: dict[str, Any]) -> dict[str, Any]:
    """model_type and geometry of a config.json, whatever the family calls its fields (GPT-2: n_embd, n_layer)."""
    out: dict[str, Any] = {"model_type": cfg.get("model_type")}
    for key, names in _GEOMETRY.items():
        out[key] = next((cfg[n] for n in names if cfg.get(n) is not None), None)
    return out


def check_same_architecture(
    sparse_cfg: dict[str, Any], dense_cfg: dict[str, Any], sparse_name: str, dense_name: str
) -> None:
    a, b = architecture(sparse_cfg), architecture(dense_cfg)
    diff = [f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b[k] and a[k] is not None and b[k] is not None]
    if diff:
        raise UserError(f"baseline '{dense_name}' is not the dense version of '{sparse_name}' ({'; '.join(diff)}): "
                        "pass the model the sparse one was compressed from")


def check_bench_architecture(model_dir: Path, name: str) -> Any:
    """The model's config, or a one-line UserError naming its architecture and what bench cannot handle."""
    from ..model_parts import require_linear_blocks_config
    from ..models import load_config

    cfg = load_config(str(model_dir))
    try:
        require_linear_blocks_config(cfg)
    except UserError as e:
        raise UserError(f"{name}: {e}")
    return cfg


def sparse_cpu_available() -> tuple[bool, str]:
    """sparse-cpu runs when its kernel library builds (gcc, from source, cached) and its runtime is importable."""
    try:
        from ..sparse_cpu import _lib
    except ImportError as e:
        return False, f"losa_deploy.sparse_cpu is not available in this install ({e})"
    try:
        _lib.load()
    except Exception as e:  # no gcc, a compile error: skip with the reason
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return False, f"its kernel library did not build ({msg})"
    if importlib.util.find_spec("losa_deploy.sparse_cpu.runtime") is None:
        return False, "losa_deploy.sparse_cpu.runtime is not available in this install"
    return True, ""


def runtime_available(rt: str) -> tuple[bool, str]:
    if rt == SPARSE_CPU:
        return sparse_cpu_available()
    mod = _REQUIRES[rt]
    if importlib.util.find_spec(mod) is None:
        return False, f"{mod} is not installed (pip install {mod})"
    if rt in GPU_RUNTIMES:
        import torch

        if not torch.cuda.is_available():
            return False, "needs a CUDA GPU"
        if rt == "torch-2of4" and torch.cuda.get_device_capability(0) < (8, 0):
            return False, "2:4 sparse tensor cores need compute capability >= 8.0 (Ampere or newer)"
    if importlib.util.find_spec("losa_deploy.runners") is None:
        return False, "losa_deploy.runners is not available in this install"
    return True, ""


def select_runtimes(requested: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """(runtimes to run, {skipped runtime: reason}). An explicitly requested runtime that is missing is an error."""
    import torch

    if requested is None:
        cand = list(CPU_RUNTIMES) + (list(GPU_RUNTIMES) if torch.cuda.is_available() else [])
        explicit = False
    else:
        cand, explicit = list(requested), True
    run, skipped = [], {}
    for rt in cand:
        ok, why = runtime_available(rt)
        if ok:
            run.append(rt)
        elif explicit:
            raise UserError(f"runtime '{rt}' was requested but {why}; drop it from --runtimes")
        else:
            skipped[rt] = why
    if not torch.cuda.is_available():
        skipped.setdefault("torch-cuda / torch-2of4", "no CUDA GPU")
    if shutil.which("trtexec") is None:
        skipped["tensorrt"] = "trtexec not on PATH"
    else:
        skipped["tensorrt"] = (
            "trtexec found; bench does not time TensorRT engines yet (export --format tensorrt, then trtexec)"
        )
    return run, skipped


def onnx_runtimes_for(config: Any, runtimes: list[str], skipped: dict[str, str], *, explicit: bool) -> list[str]:
    """Drop onnxruntime/deepsparse when the model's architecture has no KV-cache graph (they run that export):
    an error when they were asked for by name, a skip note otherwise."""
    from exporters.wrapper import wrapper_unsupported

    asked = [rt for rt in runtimes if rt in ONNX_RUNTIMES]
    why = wrapper_unsupported(config) if asked else None
    if why is None:
        return runtimes
    why = f"they run the deepsparse-format KV-cache graph, and {why}"
    if explicit:
        raise UserError(f"--runtimes {','.join(asked)} cannot bench this model: {why}")
    for rt in asked:
        skipped[rt] = why
    return [rt for rt in runtimes if rt not in ONNX_RUNTIMES]


def sparse_cpu_for(config: Any, runtimes: list[str], skipped: dict[str, str], *, explicit: bool) -> list[str]:
    """Drop sparse-cpu when its executor does not cover the model (Llama-family only): an error when it was asked
    for by name, a skip note otherwise."""
    if SPARSE_CPU not in runtimes:
        return runtimes
    from ..sparse_cpu.runtime import check_supported

    try:
        check_supported(config)
    except UserError as e:
        if explicit:
            raise UserError(f"--runtimes {SPARSE_CPU} cannot bench this model: {e}")
        skipped[SPARSE_CPU] = str(e)
        return [rt for rt in runtimes if rt != SPARSE_CPU]
    return runtimes


# ---- model facts ------------------------------------------------------------------------------------------------

def model_facts(path: Path, spec: str, inv: Any) -> dict[str, Any]:
    cfg = json.loads((path / "config.json").read_text())
    blk = [t for t in inv.tensors if t.role == "block_linear"]
    tot = sum(t.numel for t in blk)
    nnz = sum(t.nnz for t in blk)
    return {"spec": spec, "path": str(path), **architecture(cfg), "vocab": cfg.get("vocab_size"),
            "params_2d": sum(t.numel for t in inv.tensors if "(tied)" not in t.name) ,
            "block_linear_params": tot, "sparsity": (1 - nnz / tot) if tot else None}


def block_sparsity(path: Path, inv: Any) -> list[float]:
    """Per-block sparsity of the block linears: from the compress manifest's rates if present, else counted."""
    import re

    from ..artifact import block_rates

    rates = block_rates(path)
    if rates is not None:
        return rates
    per: dict[int, list[int]] = {}
    for t in inv.tensors:
        m = re.search(r"\.(\d+)\.", t.name)
        if t.role == "block_linear" and m:
            a = per.setdefault(int(m.group(1)), [0, 0])
            a[0] += t.numel - t.nnz
            a[1] += t.numel
    return [per[i][0] / per[i][1] for i in sorted(per)]


# ---- export -----------------------------------------------------------------------------------------------------

def needed_max_len(settings: Any) -> int:
    """The longest sequence any runner of these settings holds (its position table must cover it)."""
    first = settings.prompt_lens[0] + max(settings.gen_tokens, 1)
    return max(
        [first] + [p + 1 for p in settings.prompt_lens] + [settings.decode_past + max(settings.decode_tokens, 1)]
    )


def _cached_export(model_dir: Path, cache: Path, subdir: str, runtimes: str, complete: Callable[[Path], bool],
                   exporter: Callable[[], Callable[..., Any]], **settings: Any) -> Path:
    """`<model_dir>/<subdir>` or `cache` when `complete` finds the export there, else `exporter()` writes it into
    `cache` once (later runs reuse it). `exporter` imports the exporter, so a missing one is a one-line error."""
    for cand in (model_dir / subdir, cache):
        if complete(cand):
            return cand
    try:
        export = exporter()
    except ImportError as e:
        raise UserError(f"cannot export '{model_dir}' for {runtimes}: the exporter is not available ({e})")
    from ..console import err

    err.print(f"exporting {model_dir} -> {cache} ({subdir} format, once; cached)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    export(str(model_dir), str(cache), **settings)
    return cache


def _deepsparse_exporter() -> Callable[..., Any]:
    from exporters.deepsparse_export import export_deepsparse

    return export_deepsparse


def _sparse_cpu_exporter() -> Callable[..., Any]:
    from exporters.sparse_cpu_export import export_sparse_cpu

    return export_sparse_cpu


def ensure_deepsparse_export(model_dir: Path, cache: Path, *, max_len: int, threads: int) -> Path:
    """The model's DeepSparse-contract export: `<model_dir>/deepsparse` if it is there, else exported into `cache`.

    One model.onnx serves every shape (the runners fix prefill length and total length at load time), so the export
    is done once per model and reused by later runs."""
    # The graph has symbolic lengths; prefill_len/max_len here only size the position table and the export's own
    # verification (a prefill + 16 greedy tokens), so leave room for both.
    prefill = min(128, max(1, max_len // 2))
    return _cached_export(model_dir, cache, "deepsparse", "onnxruntime/deepsparse",
                          lambda d: has_export_manifest(d) and (d / "model.onnx").is_file(), _deepsparse_exporter,
                          prefill_len=prefill, max_len=max(max_len, prefill + 17), threads=threads)


def ensure_sparse_cpu_export(model_dir: Path, cache: Path, *, max_len: int, threads: int) -> Path:
    """The model's sparse-cpu export: `<model_dir>/sparse-cpu` if complete, else exported (verified) into `cache`.

    The sparse model is packed from its explicit masks (sparsity_masks.safetensors); a model without masks (the dense
    baseline) is exported as the exporter does for dense checkpoints. Reused by later runs."""
    from ..sparse_cpu.runtime import FORMAT, WEIGHTS_FILE

    def complete(d: Path) -> bool:
        return (d / WEIGHTS_FILE).is_file() and read_export_manifest(d).get("format") == FORMAT

    ml = max(max_len, 24)  # the export verifies a prompt of max_len - 8 tokens in chunks of prefill_len
    return _cached_export(model_dir, cache, SPARSE_CPU, "sparse-cpu", complete, _sparse_cpu_exporter,
                          prefill_len=min(128, ml // 2), max_len=ml, threads=threads, overwrite=True)


def model_path_for(rt: str, var: str, model_dir: Path, exports: dict[str, Path], export_root: Path, settings: Any,
                   threads: int, given: Path | None = None) -> Path:
    """What runtime `rt` loads for this variant: the deepsparse-format export (ORT, DeepSparse), the sparse-cpu
    export, or the HF directory (torch). Exports are made once per suite and cached in `exports`."""
    if rt in ONNX_RUNTIMES:
        if var not in exports:
            exports[var] = given or ensure_deepsparse_export(model_dir, export_root / var / "deepsparse",
                                                             max_len=needed_max_len(settings), threads=threads)
        return exports[var]
    if rt == SPARSE_CPU:
        key = f"{SPARSE_CPU}/{var}"
        if key not in exports:
            exports[key] = ensure_sparse_cpu_export(model_dir, export_root / var / SPARSE_CPU,
                                                    max_len=needed_max_len(settings), threads=threads)
        return exports[key]
    return model_dir


def make_factory(path: Path, runtime: str, threads: int) -> Callable[[int, int], Any]:
    from ..runners import make_runner

    rt, device = (
        ("torch", "cuda") if runtime == "torch-cuda" else (runtime, "cuda" if runtime == "torch-2of4" else "cpu")
    )

    def factory(prefill_len: int, max_len: int) -> Any:
        return make_runner(str(path), rt, prefill_len=prefill_len, max_len=max_len, threads=threads, device=device)

    return factory


def kernel_timing(sparse_dir: Path, export_dir: Path | None, measured: dict[str, Any] | None, settings: Any,
                  threads: int, rates: dict[str, Any], progress: bool) -> dict[str, Any]:
    """sparse-cpu's per-linear kernel times against their own bounds (kernels.py), and the share of a measured
    decode step they account for. A failure is reported in the suite, not fatal."""
    from ..console import err
    from .kernels import time_linears

    try:
        with err.status("sparse-cpu kernels per linear", spinner="dots") if progress else _nullctx():
            k = time_linears(sparse_dir, export_dir=export_dir, threads=threads, prompt_len=settings.prompt_lens[0],
                             bytes_per_s=rates["bytes_per_s"], flops_per_s=rates["flops_per_s"],
                             repeats=max(3, settings.repeats))
    except Exception as e:
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        err.print(f"[yellow]warning:[/yellow] sparse-cpu kernel timing failed: {msg}")
        return {"error": msg}
    dec = ((measured or {}).get("phases") or {}).get("decode")
    if dec and k["total"].get("decode") and dec.get("tokens"):
        step_s = dec["median_s"] / dec["tokens"]
        k["total"]["decode"]["share_of_step"] = k["total"]["decode"]["median_s"] / step_s
    return k


def _nullctx() -> Any:
    import contextlib

    return contextlib.nullcontext()


_WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".bin")
MEMORY_SHARE = 0.7  # all runners of a shape live together (interleaving): refuse if they would need more than this


def side_bytes(path: Path) -> int:
    """Weight bytes a runner of `path` holds resident (what its directory stores; masks excluded)."""
    return sum(f.stat().st_size for f in Path(path).iterdir()
               if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES) and f.name != MASKS_NAME)


def check_memory(paths: dict[str, Path], name: str) -> dict[str, int]:
    """{side: bytes}; a UserError when the runners of one shape would not fit in the available memory together."""
    import psutil

    need = {k: side_bytes(p) for k, p in paths.items()}
    avail = int(psutil.virtual_memory().available)
    if need and sum(need.values()) > MEMORY_SHARE * avail:
        big = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in sorted(need.items(), key=lambda kv: -kv[1]))
        raise UserError(f"{name}: the runners measured together (interleaved) need "
                        f"~{sum(need.values()) / 2**30:.1f} GiB "
                        f"of weights ({big} GiB) but {avail / 2**30:.1f} GiB is available: pass fewer --runtimes "
                        "(e.g. --runtimes onnxruntime,sparse-cpu) or fewer --blocks")
    return need


# ---- one latency suite ------------------------------------------------------------------------------------------

def latency_suite(
    name: str, description: str, dense_dir: Path, sparse_dir: Path, runtimes: Sequence[str], skipped: dict[str, str],
    settings: Any, threads: int, export_root: Path, rates: dict[str, Any], progress: bool,
    dense_export: Path | None = None, sparse_export: Path | None = None,
    variants: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..console import err
    from ..progress import make_progress
    from .bounds import bounds_for, inventory_from_dir
    from .latency import Side, bench_sides

    inv = {"dense": inventory_from_dir(dense_dir), "sparse": inventory_from_dir(sparse_dir)}
    cfg = json.loads((dense_dir / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    suite: dict[str, Any] = {"name": name, "description": description, "runtimes": {},
                             "models": {"dense": model_facts(dense_dir, str(dense_dir), inv["dense"]),
                                        "sparse": model_facts(sparse_dir, str(sparse_dir), inv["sparse"])}}
    suite["sparsity"] = suite["models"]["sparse"]["sparsity"]
    suite["bounds"] = {var: bounds_for(inv[var], sparse=var == "sparse", prompt_lens=settings.prompt_lens,
                                       decode_past=settings.decode_past, flops_per_s=rates["flops_per_s"],
                                       bytes_per_s=rates["bytes_per_s"]) for var in ("dense", "sparse")}
    suite["machine_rates"] = rates
    exports: dict[str, Path] = {}
    for rt, why in skipped.items():
        suite["runtimes"][rt] = {"status": "skipped", "note": why}
    sides: list[Side] = []
    for rt in runtimes:
        for var, model_dir in (("dense", dense_dir), ("sparse", sparse_dir)):
            if var not in (variants or {}).get(rt, VARIANTS):
                continue
            try:
                path = model_path_for(rt, var, model_dir, exports, export_root, settings, threads,
                                      dense_export if var == "dense" else sparse_export)
            except UserError:
                raise
            except Exception as e:  # an export that fails for one runtime: reported, the others still run
                note = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                err.print(f"[yellow]warning:[/yellow] {rt} {var} not measured on {name}: {note}")
                e_rt = suite["runtimes"].setdefault(rt, {"status": "ok"})
                e_rt["note"] = "; ".join(x for x in (e_rt.get("note"), f"{var}: {note}") if x)
                continue
            sides.append(Side(rt, var, make_factory(path, rt, threads), build_first=rt == "deepsparse"))
            suite["runtimes"].setdefault(rt, {"status": "ok"})[f"{var}_path"] = str(path)
    if f"{SPARSE_CPU}/sparse" in exports:  # judged against the bytes its export really streams
        from .kernels import linear_kinds

        kept_dense = frozenset(f"{n}.weight" for n, info in linear_kinds(exports[f"{SPARSE_CPU}/sparse"]).items()
                               if info.get("kind") == "dense")
        suite["bounds"][SPARSE_CPU] = bounds_for(
            inv["sparse"], sparse=True, packed=True, prompt_lens=settings.prompt_lens, decode_past=settings.decode_past,
            flops_per_s=rates["flops_per_s"], bytes_per_s=rates["bytes_per_s"], dense_linears=kept_dense)
        suite["bounds"][SPARSE_CPU]["decode"]["detail"]["linears_kept_dense"] = len(kept_dense)
    sizes = check_memory({sd.key: Path(suite["runtimes"][sd.runtime][f"{sd.variant}_path"]) for sd in sides}, name)
    cols = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with make_progress(*cols, console=err, disable=not progress, transient=True) as prog:
        task = prog.add_task(name, total=None)
        got = bench_sides(sides, settings, vocab, on_step=lambda m: prog.update(task, description=f"{name}: {m}"))
    for sd in sides:
        r = got[sd.key]
        entry = suite["runtimes"][sd.runtime]
        path = entry.pop(f"{sd.variant}_path", None)
        if r["status"] == "ok":
            r.pop("status")
            entry[sd.variant] = {**r, "model_path": path, "weight_bytes": sizes.get(sd.key)}
        else:
            err.print(f"[yellow]warning:[/yellow] {sd.key} failed on {name}: {r['note'][:200]}")
            entry["note"] = "; ".join(x for x in (entry.get("note"), f"{sd.variant}: {r['note']}") if x)
    if SPARSE_CPU in runtimes and "sparse" in (variants or {}).get(SPARSE_CPU, VARIANTS):
        suite["kernels"] = kernel_timing(sparse_dir, exports.get(f"{SPARSE_CPU}/sparse"),
                                         got.get(f"{SPARSE_CPU}/sparse"), settings, threads, rates, progress)
    for rt in runtimes:  # ok: every requested variant measured; partial: some; error: none
        entry = suite["runtimes"].get(rt)
        if entry is not None:
            want = (variants or {}).get(rt, VARIANTS)
            n = sum(var in entry for var in want)
            entry["status"] = "ok" if n == len(want) else "partial" if n else "error"
            if len(want) < len(VARIANTS):
                entry["variants"] = list(want)
    suite["exports"] = {k: str(v) for k, v in exports.items() if "/" not in k}
    suite["sparse_cpu_exports"] = {k.split("/")[1]: str(v) for k, v in exports.items()
                                   if k.startswith(SPARSE_CPU + "/")}
    from .report import finalize_suite

    return finalize_suite(suite)


# ---- accuracy ---------------------------------------------------------------------------------------------------

def accuracy(opts: BenchOptions, dense_spec: str, sparse_dir: Path, notes: list[str]) -> dict[str, Any]:
    from ..console import err
    from ..models import load_model

    acc: dict[str, Any] = {}
    want_ppl = opts.ppl_data is not None
    tasks: dict[str, str | None] = dict(opts.task_data)
    tasks.update({t: None for t in opts.tasks})
    if not want_ppl:
        notes.append("perplexity not measured: pass --ppl-data PATH (e.g. wikitext-2-raw/wiki.test.raw)")
    if not tasks:
        notes.append(
            "zero-shot not measured: pass --task-data NAME=PATH (piqa, arc_easy, boolq, hellaswag, ...) or --tasks"
        )
    if not want_ppl and not tasks:
        return acc
    zs_fn = None
    if tasks:
        try:
            from ..evaluation.zeroshot import evaluate_zeroshot as zs_fn  # type: ignore[no-redef]
        except ImportError as e:
            notes.append(f"zero-shot skipped: losa_deploy.evaluation.zeroshot unavailable ({e})")
    if want_ppl:
        acc["perplexity"] = {
            "data": opts.ppl_data,
            "data_name": Path(str(opts.ppl_data)).name,
            "seqlen": opts.ppl_seqlen,
            "max_tokens": opts.ppl_max_tokens,
            "protocol": "evaluate command (METHODS §5), fp32, cpu",
        }
    if zs_fn is not None:
        acc["zeroshot"] = {"tasks_requested": tasks, "limit": opts.limit}
    from ..cpu_gemm import cpu_gemm

    with cpu_gemm() as acc["cpu_gemm"]:  # accuracy only: the latency runtimes are measured as shipped
        for var, spec in (("dense", dense_spec), ("sparse", str(sparse_dir))):
            err.print(f"accuracy: {var} ({spec})")
            model, tok = load_model(spec, dtype="float32", device="cpu")
            if want_ppl:
                from ..evaluation.perplexity import evaluate_perplexity

                acc["perplexity"][var] = evaluate_perplexity(
                    model,
                    tok,
                    str(opts.ppl_data),
                    opts.ppl_seqlen,
                    max_tokens=opts.ppl_max_tokens,
                    progress=opts.progress,
                ).to_dict()
            if zs_fn is not None:
                acc["zeroshot"][var] = zs_fn(model, tok, tasks, opts.limit, progress=opts.progress)
            del model
    return acc


# ---- main entry -------------------------------------------------------------------------------------------------

def run_bench(opts: BenchOptions) -> tuple[dict[str, Any], dict[str, Path]]:
    """Measure, write `<out>/report.json|md`, `plots/`; returns (report, written paths).

    A failed or interrupted run removes the --out folder it created (nothing that looks like a report is left)."""
    out_dir = Path(opts.out).expanduser()
    created = not out_dir.exists()
    try:
        return _run_bench(opts)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def check_inputs(opts: BenchOptions) -> None:
    """Inputs that a typo can break and that are read late (task files, perplexity text, --out): checked before any
    model is loaded, so the mistake costs a second, not a dense model's scoring."""
    from ..artifact import check_output_room
    from ..data import check_data_path
    from ..tasks.loaders import LOCAL_TASKS

    out = Path(opts.out).expanduser()
    if out.exists() and not opts.overwrite:
        raise UserError(f"output '{out}' already exists; pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a directory")
    if not opts.skip_accuracy:
        for name, path in opts.task_data.items():
            if path is not None:
                LOCAL_TASKS[name][0](path, opts.limit)
        check_data_path(opts.ppl_data, "--ppl-data")
    check_output_room(out, 16 * 2**20)


def _checked_inputs(opts: BenchOptions) -> tuple[Path, Path, dict[str, Any], Any]:
    """Every user input checked before anything is loaded or written: (sparse dir, dense dir, dense config.json,
    the dense model's HF config)."""
    from ..artifact import check_masks
    from ..models import resolve_model
    from .shapes import validate_blocks

    if opts.sparse_dir is None:
        raise UserError("give SPARSE_DIR (a compressed model directory), or only --compare REPORT.json ...")
    sparse_dir = Path(opts.sparse_dir).expanduser()
    if not sparse_dir.is_dir() or not (sparse_dir / "config.json").is_file():
        raise UserError(
            f"SPARSE_DIR '{sparse_dir}' is not a model directory (expected config.json): pass the output of 'compress'"
        )
    if not opts.baseline:
        raise UserError(
            "--baseline is required: the dense model the sparse one came from (directory or alias, e.g. smollm2-135m)"
        )
    check_inputs(opts)
    check_masks(sparse_dir)  # masks are the contract: a sparse model whose weights left them is refused
    src = resolve_model(opts.baseline)
    if not src.is_local:
        raise UserError(
            f"--baseline '{opts.baseline}' must be a local directory or alias (bench exports it, which needs its files)"
        )
    dense_dir = Path(src.path)
    sparse_cfg = json.loads((sparse_dir / "config.json").read_text())
    dense_cfg = json.loads((dense_dir / "config.json").read_text())
    check_same_architecture(sparse_cfg, dense_cfg, str(sparse_dir), opts.baseline)
    hf_cfg = check_bench_architecture(dense_dir, f"--baseline '{opts.baseline}'")
    check_bench_architecture(sparse_dir, f"SPARSE_DIR '{sparse_dir}'")
    if opts.batch != 1:
        raise UserError("--batch: the runners time batch 1 only (the fixed-shape DeepSparse contract); use --batch 1")
    for flag, v in (("--decode-past", opts.decode_past), ("--warmup", opts.warmup)):
        if v < 0:
            raise UserError(f"{flag} must be >= 0 (got {v})")
    if opts.repeats < 1:
        raise UserError(f"--repeats must be >= 1 (got {opts.repeats})")
    if opts.decode_tokens < 0 or opts.gen_tokens < 0:
        raise UserError("--decode-tokens and --gen-tokens must be >= 0")
    if opts.decode_tokens > 0 and opts.decode_past < 1:
        raise UserError("--decode-past must be >= 1 (the decode phase starts from a prefilled past)")
    if opts.shapes:
        validate_blocks(opts.blocks)
    if opts.sparsity is not None and not 0 <= opts.sparsity < 1:
        raise UserError(f"--sparsity must be in [0, 1) (got {opts.sparsity})")
    return sparse_dir, dense_dir, dense_cfg, hf_cfg


def _machine_rates(threads: int) -> dict[str, Any]:
    from ..console import err
    from .bounds import measure_bandwidth, measure_peak_flops

    err.print(f"measuring machine peaks ({threads} threads)")
    fl = measure_peak_flops(threads)
    bw = measure_bandwidth(threads=threads)
    return {"flops_per_s": fl["flops_per_s"], "flops_method": fl["method"], "bytes_per_s": bw["bytes_per_s"],
            "bandwidth_method": bw["method"]}


def _latency_suites(opts: BenchOptions, rep: dict[str, Any], sparse_dir: Path, dense_dir: Path,
                    dense_cfg: dict[str, Any], runtimes: list[str], skipped: dict[str, str], variants: Any,
                    settings: Any, threads: int, out_dir: Path) -> None:
    """The real model's suite and, with --shapes, the synthetic blocks' suite, appended to `rep["suites"]`."""
    from ..console import err
    from .shapes import build_shape_pair, linear_rates_from_model

    rates = rep["machine_rates"] = _machine_rates(threads)
    suites_rts = [r for r in runtimes if r not in GPU_RUNTIMES] + [r for r in runtimes if r in GPU_RUNTIMES]
    if not (opts.shapes and opts.skip_model_latency):
        title = (f"{sparse_dir.name} vs {opts.baseline} ({dense_cfg.get('model_type')}, "
                 f"{dense_cfg.get('num_hidden_layers')} blocks)")
        rep["suites"].append(latency_suite("model", title, dense_dir, sparse_dir, suites_rts, skipped, settings,
                                           threads, out_dir / "exports" / "model", rates, opts.progress,
                                           variants=variants))
    if opts.shapes:
        lr: dict[str, float] | float = (
            opts.sparsity if opts.sparsity is not None else linear_rates_from_model(sparse_dir)
        )
        tag = f"{opts.shapes}-{opts.blocks}b-" + (f"s{opts.sparsity:g}" if opts.sparsity is not None else "rates")
        shape_root = out_dir / "shapes" / tag
        err.print(f"building {opts.blocks} {opts.shapes}-shaped blocks (dense + sparse) in {shape_root}")
        info = build_shape_pair(
            shape_root, shape=opts.shapes, blocks=opts.blocks, rates=lr, seed=opts.seed, progress=opts.progress
        )
        suite = latency_suite(
            f"shapes:{opts.shapes}x{opts.blocks}",
            f"{opts.blocks} random decoder blocks with {opts.shapes} shapes, magnitude-pruned per row; "
            f"{info['settings']['lm_head']}",
            Path(info["dense_dir"]), Path(info["sparse_dir"]), suites_rts, skipped, settings, threads,
            shape_root / "exports", rates, opts.progress, variants=variants,
        )
        suite["shapes"] = info["settings"]
        rep["suites"].append(suite)


def _reprobe_rates(rep: dict[str, Any], threads: int) -> None:
    """Probe again after the suites: a probe disturbed by another process reads low, never high; keep the higher,
    and recompute every suite's share of bound with it."""
    from .report import apply_rates

    second = _machine_rates(threads)
    rates2 = dict(rep["machine_rates"])
    later = " (second probe, after the suites)"
    if second["flops_per_s"] > rates2["flops_per_s"]:
        rates2.update(flops_per_s=second["flops_per_s"], flops_method=second["flops_method"] + later)
    if second["bytes_per_s"] > rates2["bytes_per_s"]:
        rates2.update(bytes_per_s=second["bytes_per_s"], bandwidth_method=second["bandwidth_method"] + later)
    rates2["probes"] = {"flops_per_s": [rep["machine_rates"]["flops_per_s"], second["flops_per_s"]],
                        "bytes_per_s": [rep["machine_rates"]["bytes_per_s"], second["bytes_per_s"]]}
    rep["machine_rates"] = rates2
    for suite in rep["suites"]:
        apply_rates(suite, rates2)


def _print_report(rep: dict[str, Any]) -> None:
    from ..console import out
    from .report import headline_lines, rich_tables

    for t in rich_tables(rep):
        out.print(t)
    for line in headline_lines(rep):
        out.print(f"headline speed-up, {line}", soft_wrap=True, markup=False)
    for f in rep["flags"]:
        out.print(f"flag: too wide to quote: {f}", soft_wrap=True, markup=False, style="yellow")


def _run_bench(opts: BenchOptions) -> tuple[dict[str, Any], dict[str, Path]]:
    from .bounds import inventory_from_dir
    from .latency import LatencySettings
    from .pairs import MAX_REL_WIDTH, MIN_PAIRS
    from .report import new_report, write_report
    from .timing import resolve_threads

    sparse_dir, dense_dir, dense_cfg, hf_cfg = _checked_inputs(opts)
    threads = resolve_threads(opts.threads)
    settings = LatencySettings(tuple(opts.prompt_lens), opts.decode_past, opts.decode_tokens, opts.gen_tokens,
                               opts.batch, opts.warmup, opts.repeats, opts.seed)
    names, variants = split_variants(opts.runtimes)
    runtimes, skipped = ([], {}) if opts.skip_latency else select_runtimes(names)
    runtimes = onnx_runtimes_for(hf_cfg, runtimes, skipped, explicit=opts.runtimes is not None)
    runtimes = sparse_cpu_for(hf_cfg, runtimes, skipped, explicit=opts.runtimes is not None)
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = new_report(
        {"threads": threads, "latency": settings.to_dict(),
         "runtimes_requested": list(opts.runtimes) if opts.runtimes else None, "runtimes_run": runtimes,
         "runtimes_skipped": skipped, "shapes": opts.shapes, "blocks": opts.blocks if opts.shapes else None,
         "sparsity_override": opts.sparsity, "skip_accuracy": opts.skip_accuracy, "skip_latency": opts.skip_latency},
        opts.command or sys.argv,
    )
    inv_s, inv_d = inventory_from_dir(sparse_dir), inventory_from_dir(dense_dir)
    rep["models"] = {"dense": model_facts(dense_dir, opts.baseline, inv_d),
                     "sparse": model_facts(sparse_dir, str(sparse_dir), inv_s)}
    bs = block_sparsity(sparse_dir, inv_s)
    rep["models"]["sparse"]["block_sparsity"] = bs
    rep["notes"].append("figures are medians over repeats after warm-up; peak RSS is the whole process's high-water "
                        "mark during the suite (all runtimes of a shape are loaded together); load_rss_bytes is the "
                        "resident growth when that side's runner was built")
    rep["notes"] += [f"runtime {k} skipped: {v}" for k, v in skipped.items()]
    if not opts.skip_latency and runtimes:
        _latency_suites(opts, rep, sparse_dir, dense_dir, dense_cfg, runtimes, skipped, variants, settings, threads,
                        out_dir)
    if not opts.skip_accuracy:
        rep["accuracy"] = accuracy(
            opts, str(dense_dir) if opts.baseline is None else opts.baseline, sparse_dir, rep["notes"]
        )
    if rep["suites"]:
        _reprobe_rates(rep, threads)
    rep["flags"] = [f"{suite['name']}: {f}" for suite in rep["suites"] for f in suite.get("flags") or []]
    if rep["suites"]:
        rep["notes"].append(f"speed-ups: dense and sparse repetitions interleaved round by round; each speed-up is the "
                            f"median of per-round ratios with a distribution-free interval of that median; one is "
                            f"too wide to quote (flagged) with < {MIN_PAIRS} pairs or an interval wider than "
                            f"{100 * MAX_REL_WIDTH:.0f}% of the median")
    paths = write_report(rep, out_dir, bs)
    _print_report(rep)
    return rep, paths


def run_compare(
    report_paths: Sequence[Path], out_dir: Path | None, extra: Sequence[tuple[str, dict[str, Any]]] = ()
) -> tuple[dict[str, Any], dict[str, Path]]:
    from ..atomic import write_json, write_text
    from ..console import out
    from .report import compare_reports, compare_rich_table, labels_for, load_report, render_compare_markdown

    reps = [(lab, load_report(p)) for lab, p in zip(labels_for(report_paths), report_paths)] + list(extra)
    cmp = compare_reports(reps)
    out.print(compare_rich_table(cmp))
    for w in cmp["warnings"]:
        out.print(f"[yellow]warning:[/yellow] {w}")
    paths: dict[str, Path] = {}
    if out_dir is not None:
        paths["json"] = write_json(Path(out_dir) / "compare.json", cmp)
        paths["md"] = write_text(Path(out_dir) / "compare.md", render_compare_markdown(cmp))
    return cmp, paths
