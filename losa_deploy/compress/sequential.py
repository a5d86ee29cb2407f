"""The one block-by-block calibration pipeline (METHODS §1) that every method plugs into.

`walk_blocks` captures the hidden states (and whatever keyword arguments the current transformers version
passes: attention mask, position ids, rotary cos/sin, cache position) entering block 0, then hands each block
in turn to a *visitor* together with its inputs; the visitor gathers statistics, prunes, measures, and the
block's outputs become the next block's inputs. Only one block's activations (nsamples x seqlen x hidden) are
alive at a time, samples go through a block one at a time, and with `offload` only the current block sits on
the compute device. Pruning (`prune.prune_sequential`), RMI's Gram matrices (`collect_block_grams`) and OWL's
outlier ratios (`collect_outlier_ratios`) are visitors on that one walk, so a fix to the data flow is made once.
"""

from __future__ import annotations

import contextlib
import math
import time
from contextvars import ContextVar
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..console import err
from ..cpu_gemm import gram
from ..model_parts import block_prefix, find_blocks, find_linears

__all__ = [
    "walk_blocks",
    "capture_block_inputs",
    "capture_block_kwargs",
    "run_block",
    "gather_stats",
    "collect_block_grams",
    "collect_outlier_ratios",
    "collect_wanda_stats",
    "block_compute",
]


class _Captured(Exception):
    """Raised by the block-0 pre-hook once its inputs are recorded, to skip the rest of the forward."""


# Visitor(index, param-name prefix, block, inputs [n, seq, hidden], block kwargs) -> next inputs or None
BlockVisitor = Callable[[int, str, nn.Module, Tensor, dict], "Tensor | None"]


# ---------------------------------------------------------------------------------------------------------
# arithmetic of the calibration forwards
# ---------------------------------------------------------------------------------------------------------
_BLOCK_DTYPE: ContextVar["torch.dtype | None"] = ContextVar("losa_block_dtype", default=None)


@contextlib.contextmanager
def block_compute(dtype: "torch.dtype | None"):
    """Run every calibration block forward inside this context under autocast to `dtype` (None: as stored).

    Only the block forwards change: weights, masks, statistics (Wanda norms, SparseGPT Hessians) and all
    pruning math stay float32. On CPUs with native bf16 a block forward takes about half the time.
    """
    token = _BLOCK_DTYPE.set(dtype)
    try:
        yield
    finally:
        _BLOCK_DTYPE.reset(token)


def _block_autocast(hidden: Tensor):
    dtype = _BLOCK_DTYPE.get()
    if dtype is None or dtype == hidden.dtype:
        return contextlib.nullcontext()
    # No weight-cast cache: weights change between the statistics pass and the re-run of the same block.
    return torch.autocast(hidden.device.type, dtype=dtype, cache_enabled=False)


def _no_autocast(x: Tensor):
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------
# capture and replay
# ---------------------------------------------------------------------------------------------------------
def _move(obj: Any, device: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _place_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: Any) -> None:
    """Move every parameter and buffer that is not inside a decoder block (embeddings, norms, rotary, head)."""
    inside = {id(m) for m in blocks.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for k, p in mod._parameters.items():
            if p is not None and p.device != torch.device(device):
                p.data = p.data.to(device)
        for k, b in mod._buffers.items():
            if b is not None and b.device != torch.device(device):
                mod._buffers[k] = b.to(device)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _replay_kwargs(kwargs: dict, device: Any) -> dict:
    """A block's keyword arguments made safe to replay: no hidden states, no KV cache, no attention outputs."""
    kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    for k in ("past_key_value", "past_key_values", "layer_past"):
        if k in kw:
            kw[k] = None
    kw["use_cache"] = False
    if "output_attentions" in kw:
        kw["output_attentions"] = False
    return _move(kw, device)


@torch.no_grad()
def capture_block_kwargs(
    model: nn.Module, first_ids: Tensor, hidden0: Tensor, kwargs0: dict, *, device: Any = "cpu"
) -> list[dict]:
    """The keyword arguments each block receives, for one sequence: models that mix sliding-window and global
    attention (Gemma 2/3, Mistral/Qwen2 with a window) hand different masks or rotary tables to different blocks.

    Every block's forward is swapped for a pass-through that records its kwargs (no block computes), and the last
    one stops the forward before the head. Block 0 runs once for real, to learn whether blocks return a tuple.
    """
    _, blocks = find_blocks(model)
    dev0 = next(blocks[0].parameters()).device
    blocks[0].to(device)
    y = blocks[0](hidden0[:1], **kwargs0)
    blocks[0].to(dev0)
    as_tuple = isinstance(y, (tuple, list))
    got: list[dict | None] = [None] * len(blocks)

    def make(j: int) -> Callable:
        def passthrough(*args: Any, **kwargs: Any) -> Any:
            h = args[0] if args else kwargs["hidden_states"]
            got[j] = _replay_kwargs(kwargs, device)
            if j == len(blocks) - 1:
                raise _Captured
            return (h,) if as_tuple else h

        return passthrough

    for j, blk in enumerate(blocks):
        blk.forward = make(j)
    try:
        model(input_ids=first_ids[:1].to(device), use_cache=False)
    except _Captured:
        pass
    finally:
        for blk in blocks:
            del blk.forward  # back to the class's forward
    return [g if g is not None else kwargs0 for g in got]


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, calib_ids: Tensor, *, device: Any = "cpu", offload: bool = False
) -> tuple[Tensor, dict]:
    """Run each calibration sequence up to block 0 and record what block 0 receives.

    Returns (hidden [n, seqlen, hidden] on `device`, kwargs to replay every block with). The kwargs are those
    of the first sample (all samples share a length and have no padding, so masks and rotary tables agree);
    the KV cache is dropped and `use_cache=False` forced.
    """
    _, blocks = find_blocks(model)
    if offload:
        _place_outside_blocks(model, blocks, device)
    else:
        model.to(device)
    n, seqlen = calib_ids.shape
    store: dict[str, Any] = {"hidden": None, "kwargs": None}
    dtype = next(blocks[0].parameters()).dtype

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            h = args[0]
        else:
            h = kwargs.pop("hidden_states")
        if store["hidden"] is None:
            store["hidden"] = torch.empty((n, seqlen, h.shape[-1]), dtype=dtype, device=device)
        store["hidden"][store["i"]] = h[0].to(device=device, dtype=dtype)
        if store["kwargs"] is None:
            store["kwargs"] = _replay_kwargs(kwargs, device)
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(n):
            store["i"] = i
            try:
                model(input_ids=calib_ids[i : i + 1].to(device), use_cache=False)
            except _Captured:
                pass
            else:  # pragma: no cover - a model whose forward never calls its first block
                raise RuntimeError(f"block 0 of {type(model).__name__} was never called during the forward pass")
    finally:
        handle.remove()
    return store["hidden"], store["kwargs"]


@torch.no_grad()
def run_block(block: nn.Module, hidden: Tensor, kwargs: dict, out: Tensor | None = None) -> Tensor:
    """Block outputs for every sample, one sample at a time (memory: one sequence's activations).

    Batching samples gains nothing on CPU: at 512 tokens a block's matmuls already run at the machine's peak
    (measured on the embedded model, docs/benchmarks.md)."""
    if out is None:
        out = torch.empty_like(hidden)
    with _block_autocast(hidden):
        for i in range(hidden.shape[0]):
            y = block(hidden[i : i + 1], **kwargs)
            if isinstance(y, (tuple, list)):
                y = y[0]
            out[i] = y[0]
    return out


def _progress(desc: str, total: int, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..progress import make_progress

    return make_progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("blocks"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=not enabled, transient=True,
    )


@torch.no_grad()
def walk_blocks(
    model: nn.Module,
    calib_ids: Tensor,
    visitor: BlockVisitor,
    *,
    device: Any = "cpu",
    offload: bool = False,
    progress: bool = True,
    desc: str = "blocks",
    last_output: bool = True,
) -> dict[str, float]:
    """Capture block-0 inputs, then visit every block in order; returns timings (seconds).

    The visitor may return the block's outputs (if it already computed them); otherwise the block is re-run on
    its inputs after the visit (so it sees any change the visitor made). `last_output=False` skips running the
    last block when the visitor does not need it.
    """
    t0 = time.perf_counter()
    name, blocks = find_blocks(model)
    was_training = model.training
    model.eval()
    hidden, kwargs0 = capture_block_inputs(model, calib_ids, device=device, offload=offload)
    per_block = capture_block_kwargs(model, calib_ids[:1], hidden, kwargs0, device=device)
    t_capture = time.perf_counter() - t0
    try:
        with _progress(desc, len(blocks), progress) as prog:
            task = prog.add_task(desc, total=len(blocks))
            for i, blk in enumerate(blocks):
                if offload:
                    blk.to(device)
                kwargs = per_block[i]
                nxt = visitor(i, block_prefix(name, i), blk, hidden, kwargs)
                if nxt is None and (last_output or i < len(blocks) - 1):
                    nxt = run_block(blk, hidden, kwargs)
                if offload:
                    blk.to("cpu")
                    if torch.device(device).type == "cuda":
                        torch.cuda.empty_cache()
                hidden = nxt
                prog.update(task, advance=1)
    finally:
        if offload:
            _place_outside_blocks(model, blocks, "cpu")
        model.train(was_training)
    return {"capture_s": t_capture, "total_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------
class _Stats:
    """Per-input statistics of one linear (shared by linears that read the same tensor, e.g. q/k/v)."""

    def __init__(self, in_features: int, device: Any, need_sq: bool, need_h: bool) -> None:
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device) if need_sq else None
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if need_h else None
        self.nsamples = 0
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        with _no_autocast(x):  # statistics are float32 even when the block forward is not
            self._add(x.reshape(-1, x.shape[-1]).float())

    def _add(self, x: Tensor) -> None:
        self.tokens += x.shape[0]
        if self.sq is not None:
            self.sq += (x * x).sum(dim=0)
        if self.H is not None:
            # SparseGPT reference accumulation: H = (2 / nsamples) * sum over samples of X X^T, as a running mean.
            self.H *= self.nsamples / (self.nsamples + 1)
            self.nsamples += 1
            xs = math.sqrt(2.0 / self.nsamples) * x
            self.H += gram(xs)  # oneDNN inside cpu_gemm (MKL's AVX2 path is 2x slower on AMD)
        else:
            self.nsamples += 1


@torch.no_grad()
def gather_stats(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    hidden: Tensor,
    kwargs: dict,
    *,
    need_sq: bool,
    need_h: bool,
) -> tuple[dict[str, _Stats], Tensor]:
    """Run the block once with input hooks on `linears`; return ({name: stats}, block outputs).

    Linears fed the very same tensor (q/k/v, gate/up) share one accumulator: found on the first sample by
    object identity (the cached tensors are kept alive, so an id cannot be reused within the sample).
    """
    stats: dict[str, _Stats] = {}
    owner: dict[int, tuple[Tensor, _Stats]] = {}
    handles: dict[str, Any] = {}
    aliases: set[str] = set()
    first = {"on": True}

    def make_hook(lname: str, lin: nn.Linear):
        def hook(mod: nn.Module, inp: tuple, out: Any) -> None:
            x = inp[0]
            if first["on"]:
                hit = owner.get(id(x))
                if hit is not None and hit[0] is x:
                    stats[lname] = hit[1]
                    aliases.add(lname)
                    return
                st = stats.setdefault(lname, _Stats(lin.in_features, x.device, need_sq, need_h))
                owner[id(x)] = (x, st)
            stats[lname].add(x)

        return hook

    for lname, lin in linears.items():
        handles[lname] = lin.register_forward_hook(make_hook(lname, lin))
    out = torch.empty_like(hidden)
    try:
        for i in range(hidden.shape[0]):
            with _block_autocast(hidden):
                y = block(hidden[i : i + 1], **kwargs)
            if isinstance(y, (tuple, list)):
                y = y[0]
            out[i] = y[0]
            if first["on"]:
                first["on"] = False
                owner.clear()
                for a in aliases:  # their statistics come from the shared accumulator
                    handles.pop(a).remove()
    finally:
        for h in handles.values():
            h.remove()
    return stats, out


# ---------------------------------------------------------------------------------------------------------
# allocation statistics on the same walk
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_block_grams(
    model: nn.Module, calib_ids: Tensor, *, device: Any = "cpu", offload: bool = False, progress: bool = True,
    chunk: int = 65536,
) -> list[Tensor]:
    """RMI: for each block, the N x N Gram matrix (float64, CPU) of its input hidden states flattened per sample.

    Accumulated over feature chunks block by block, so memory is one block's activations plus N x N per block.
    """
    grams: list[Tensor] = []

    def visit(i: int, prefix: str, block: nn.Module, hidden: Tensor, kwargs: dict) -> None:
        X = hidden.reshape(hidden.shape[0], -1)
        G = torch.zeros(X.shape[0], X.shape[0], dtype=torch.float64, device=X.device)
        for c in range(0, X.shape[1], chunk):
            xc = X[:, c : c + chunk].double()
            G += xc @ xc.T
        grams.append(G.cpu())
        return None

    walk_blocks(model, calib_ids, visit, device=device, offload=offload, progress=progress,
                desc="RMI Gram matrices", last_output=False)
    return grams


@torch.no_grad()
def collect_wanda_stats(
    model: nn.Module, calib_ids: Tensor, *, ignore: Sequence[str] = (), device: Any = "cpu", offload: bool = False,
    progress: bool = True, desc: str = "dense statistics",
) -> dict[str, Tensor]:
    """Dense-model Wanda statistics {full weight name: sum_t x_tj^2 [in], fp32, CPU}, in one dense pass."""
    out: dict[str, Tensor] = {}

    def visit(i: int, prefix: str, block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
        linears = find_linears(block, ignore, prefix=prefix)
        stats, y = gather_stats(block, linears, hidden, kwargs, need_sq=True, need_h=False)
        for lname in linears:
            out[f"{prefix}{lname}.weight"] = stats[lname].sq.cpu()
        return y

    walk_blocks(model, calib_ids, visit, device=device, offload=offload, progress=progress, desc=desc,
                last_output=False)
    return out


@torch.no_grad()
def collect_outlier_ratios(
    model: nn.Module, calib_ids: Tensor, m: float = 5.0, *, ignore: Sequence[str] = (), device: Any = "cpu",
    offload: bool = False, progress: bool = True, sq_stats: dict[str, Tensor] | None = None,
) -> list[float]:
    """OWL: per block, the share of the dense model's Wanda scores (all its linears together) above m x mean.

    Pass `sq_stats` (from `collect_wanda_stats`) to reuse a dense pass already made.
    """
    from ..allocation import owl_outlier_ratio
    from ..pruning.scores import wanda_scores

    if sq_stats is None:
        sq_stats = collect_wanda_stats(model, calib_ids, ignore=ignore, device=device, offload=offload,
                                       progress=progress, desc="OWL outlier ratios")
    name, blocks = find_blocks(model)
    ratios: list[float] = []
    for i, blk in enumerate(blocks):
        pre = block_prefix(name, i)
        scores = [
            wanda_scores(lin.weight.data, sq_stats[f"{pre}{ln}.weight"]).flatten()
            for ln, lin in find_linears(blk, ignore, prefix=pre).items()
        ]
        ratios.append(float(owl_outlier_ratio(torch.cat(scores), m)) if scores else 0.0)
    return ratios
