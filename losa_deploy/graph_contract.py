"""The fixed-shape KV-cache graph contract shared by the exporters (which write the graph) and the runners (which
feed it): cache geometry, input/output names, engine input shapes and a static-shape copy of a graph.

It sits below both `exporters/` and `losa_deploy.runners` and imports neither, so the runners need no exporter code.
See exporters/wrapper.py for the full I/O description.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import UserError


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a decoder config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv, hd


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "positions", "causal_mask"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def engine_shapes(config: Any, seq: int, max_len: int) -> list[list[int]]:
    """Input shapes for an engine that takes `seq` new tokens with a fixed total length `max_len`."""
    layers, kv, hd = kv_geometry(config)
    past = max_len - seq
    shapes = [[1, seq], [1, max_len], [1, seq], [1, 1, seq, max_len]]
    shapes += [[1, kv, past, hd]] * (2 * layers)
    return shapes


def static_graph_copy(onnx_path: str, dst_dir: str, name: str, shapes: list[list[int]]) -> str:
    """Write a copy of the graph (not the weights) with fixed input shapes into `dst_dir`, its external data file
    symlinked; DeepSparse rewrites a model in place when given input_shapes, so it never sees the shipped file."""
    import os
    from pathlib import Path

    import onnx

    src = Path(onnx_path).resolve()
    m = onnx.load(str(src), load_external_data=False)
    init_names = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in init_names]
    if len(inputs) != len(shapes):
        raise ValueError(f"{src}: {len(inputs)} inputs, {len(shapes)} shapes")
    for inp, shp in zip(inputs, shapes):
        for d, v in zip(inp.type.tensor_type.shape.dim, shp):
            d.ClearField("dim_param")
            d.dim_value = v
    locations = {e.value for i in m.graph.initializer for e in i.external_data if e.key == "location"}
    for loc in locations:
        link = Path(dst_dir) / loc
        if not link.exists():
            os.symlink(src.parent / loc, link)
    out = Path(dst_dir) / f"{name}.onnx"
    onnx.save_model(m, str(out))
    return str(out)


# ---- the Runner protocol's inputs (shared by runners.py and sparse_cpu/runtime.py)

def default_threads() -> int:
    """The cores this process may run on (the runners' default thread count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def as_ids(ids: Any) -> np.ndarray:
    """Token ids as int64 [1, P] (a 1-D sequence becomes one row)."""
    a = np.asarray(ids, dtype=np.int64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] != 1 or a.shape[1] < 1:
        raise UserError(f"prefill expects token ids of shape [1, P] with P >= 1, got {list(a.shape)}")
    return a


def check_prompt_fits(tokens: int, max_len: int) -> None:
    """A prefill of `tokens` must leave at least one slot of `max_len` for the next token."""
    if tokens > max_len - 1:
        raise UserError(f"prompt of {tokens} tokens does not fit max_len={max_len}; use a larger --max-len")
