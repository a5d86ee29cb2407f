"""A small nn.Module around an HF causal LM with DeepSparse's KV-cache I/O contract, traced with torch.onnx.

Inputs:  input_ids [1,S] int64, attention_mask [1,T] int64 (T = past + S; 1 = real token), positions [1,S] int64,
         causal_mask [1,1,S,T] int64 (1 = may attend), past_key_values.{i}.key/value [1, kv_heads, past, head_dim].
Outputs: logits [1,S,V], present.{i}.key/value [1, kv_heads, T, head_dim].
The cache is right-aligned: the newest entries are at the end, unused slots at the start are masked out by
attention_mask; a caller drops the oldest entry after each step so the past length stays fixed (DeepSparse style).

Architectures: the HF model itself runs inside the wrapper (eager attention), so biases, q/k norms, Gemma's
`(1 + w)` norms, embedding scale and soft-capping are traced as the model computes them. What the wrapper
supplies is what HF would derive at run time: the rotary tables (every `rotary_emb*` module, e.g. Gemma-3's
local and global ones) and the attention masks, including a sliding-window mask for models whose blocks (all of
them, or those `config.layer_types` marks "sliding_attention") attend to the last `sliding_window` positions only.
A slot's position is its count of valid slots before it (what the runners feed: tokens in order from position 0).
`check_wrapper_support` refuses what it cannot reproduce, with the reason.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn

from losa_deploy.graph_contract import io_names, kv_geometry


class TableRotary(nn.Module):
    """Rotary embedding as a lookup in precomputed cos/sin tables (constant initializers + Gather).

    Why: DeepSparse 1.8's graph compiler aborts (assertion in execution/graph.cpp) when the rotary angles are
    computed at run time from the `positions` input (Cast -> MatMul -> Cos/Sin); a Gather from a constant table
    compiles, and is what older Llama exports did (cos_cached[position_ids])."""

    def __init__(self, rotary: nn.Module, table_len: int, dtype: torch.dtype) -> None:
        super().__init__()
        with torch.no_grad():
            probe = torch.zeros(1, 1, dtype=dtype)
            cos, sin = rotary(probe, torch.arange(table_len)[None])
        self.register_buffer("cos_table", cos[0].to(dtype).contiguous(), persistent=False)
        self.register_buffer("sin_table", sin[0].to(dtype).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_table[position_ids].to(x.dtype), self.sin_table[position_ids].to(x.dtype)


def _find_rotaries(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of every rotary module of the decoder (`rotary_emb`, Gemma-3's `rotary_emb_local`)."""
    base = getattr(model, "model", None)
    if base is None:
        return []
    return [(base, name) for name, mod in base.named_children() if name.startswith("rotary_emb")]


# model types whose rotary tables, masks and attention the wrapper reproduces (tested on tiny models: all but
# olmo and granite, which only pass through the same code paths)
WRAPPER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "granite")
# model types that apply `config.sliding_window` to every block (the others say per block in `config.layer_types`)
_ALL_SLIDING_TYPES = ("mistral", "phi3")
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def attention_layout(config: Any) -> tuple[str, int | None]:
    """("full" | "all-sliding" | "per-layer", window): how the blocks of `config` mask attention."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return ("per-layer", window) if window and "sliding_attention" in types else ("full", None)
    if window and getattr(config, "model_type", None) in _ALL_SLIDING_TYPES:
        return "all-sliding", int(window)
    return "full", None


def rotary_table_limit(config: Any) -> int | None:
    """The longest position table that reproduces HF's rotary angles (None: any length).

    `dynamic` and `longrope` scaling change the angles once a sequence passes the original context length, so one
    fixed table matches HF only up to that length."""
    rs = getattr(config, "rope_scaling", None) or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind in _LENGTH_DEPENDENT_ROPE:
        return int(getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
    return None


def wrapper_unsupported(config: Any, max_len: int | None = None) -> str | None:
    """Why the KV-cache graph cannot reproduce `config`'s model (one clause naming the architecture), or None."""
    mt = getattr(config, "model_type", None)
    arch = (getattr(config, "architectures", None) or [mt])[0]
    if mt not in WRAPPER_TYPES:
        extra = " (for Gemma-3 multimodal, export its text model, Gemma3ForCausalLM)" if mt == "gemma3" else ""
        return f"{arch} (model_type '{mt}') is not one of the families it covers ({', '.join(WRAPPER_TYPES)}){extra}"
    odd = sorted(set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"})
    if odd:
        return f"{arch} uses attention type(s) {', '.join(odd)}, and only full and sliding-window attention are built"
    if getattr(config, "use_bidirectional_attention", False):
        return f"{arch} has use_bidirectional_attention, and the graph is causal"
    limit = rotary_table_limit(config)
    if limit is not None and max_len is not None and max_len > limit:
        return (f"{arch}'s rope scaling changes its rotary angles beyond {limit} tokens, which a fixed position table "
                f"cannot follow (use --max-len {limit} or less)")
    return None


def check_wrapper_support(config: Any, fmt: str, max_len: int | None = None) -> None:
    """One-line UserError naming the architecture and what the KV-cache wrapper graph cannot reproduce."""
    from losa_deploy.errors import UserError

    why = wrapper_unsupported(config, max_len)
    if why is not None:
        raise UserError(f"--format {fmt} cannot export this model: {why}; --format onnx takes any family optimum does")


class KVCacheLM(nn.Module):
    """Builds the 4-D additive mask itself (from causal_mask x attention_mask) so no vmap/SDPA mask code is traced,
    and swaps the rotary embedding for a table lookup (see TableRotary). Use as a context manager-free wrapper:
    `restore()` puts the model's own rotary module back."""

    def __init__(self, model: nn.Module, table_len: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.layout, self.window = attention_layout(model.config)
        self._restore: list[tuple[nn.Module, str, nn.Module]] = []
        n = table_len or int(getattr(model.config, "max_position_embeddings", 4096))
        limit = rotary_table_limit(model.config)
        n = min(n, limit) if limit else n
        dtype = model.get_input_embeddings().weight.dtype
        for owner, attr in _find_rotaries(model):
            orig = getattr(owner, attr)
            setattr(owner, attr, TableRotary(orig, n, dtype))
            self._restore.append((owner, attr, orig))

    def restore(self) -> None:
        while self._restore:
            owner, attr, orig = self._restore.pop()
            setattr(owner, attr, orig)

    def forward(self, input_ids, attention_mask, positions, causal_mask, *past):  # type: ignore[override]
        from transformers import DynamicCache

        s = input_ids.shape[1]
        t = attention_mask.shape[1]
        dtype = self.model.get_input_embeddings().weight.dtype
        allowed = causal_mask.to(torch.bool) & attention_mask[:, None, None, :].to(torch.bool)
        # A query row must never be fully masked (left padding): let every query see itself, so softmax stays finite.
        rows = torch.arange(s, device=input_ids.device)[:, None] + (t - s)
        cols = torch.arange(t, device=input_ids.device)[None, :]
        diag = (rows == cols)[None, None]
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype)
        zero = torch.zeros((), dtype=dtype)
        mask4d: Any = torch.where(allowed | diag, zero, neg)
        if self.layout != "full":
            # key position = valid slots before it; HF's window: a query at q sees keys k with q - k < window
            kpos = torch.cumsum(attention_mask, dim=-1) - 1
            near = (positions[:, None, :, None] - kpos[:, None, None, :]) < self.window
            sliding = torch.where((allowed & near) | diag, zero, neg)
            if self.layout == "all-sliding":
                mask4d = sliding
            else:  # per block, as the model's own mask mapping (keyed by config.layer_types)
                mask4d = {"full_attention": mask4d, "sliding_attention": sliding}
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=mask4d, position_ids=positions,
                         past_key_values=cache, use_cache=True, return_dict=True)
        pkv = out.past_key_values
        presents = []
        for i in range(self.num_layers):
            layer = pkv.layers[i] if hasattr(pkv, "layers") else None
            k, v = (layer.keys, layer.values) if layer is not None else pkv[i]
            presents += [k, v]
        return (out.logits, *presents)


def graph_parity_fp32(model: nn.Module, ids: Any, ref_logits: Any, ref_tokens: list[int], *, prefill_len: int,
                      max_len: int, table_len: int) -> dict:
    """The wrapper's computation (masks, rotary tables, fixed right-aligned cache) run in PyTorch fp32 through the
    runners' own bookkeeping, against the model's own forward: the architecture check of a graph that is traced in
    fp16 (tensorrt), whose ONNX Runtime run can only be compared loosely. Returns `verify.compare`'s dict."""
    from pathlib import Path

    from losa_deploy.runners import _FixedShapeKVRunner

    from .verify import LOGIT_ATOL_FP32, compare, greedy

    wrapper = KVCacheLM(model, table_len).eval()

    class _Eager(_FixedShapeKVRunner):
        def _run(self, seq: int, feeds: list) -> list:
            with torch.no_grad():
                outs = wrapper(*[torch.from_numpy(f) for f in feeds])
            return [o.float().numpy() for o in outs]

    try:
        r = _Eager(Path("-"), model.config, prefill_len, max_len, 1)  # reads no file
        logits, toks = greedy(r.prefill, r.decode, ids, len(ref_tokens))
    finally:
        wrapper.restore()
    return compare(ref_logits, ref_tokens, logits, toks, LOGIT_ATOL_FP32)


def dummy_inputs(config: Any, seq: int, past: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    layers, kv, hd = kv_geometry(config)
    t = past + seq
    ids = torch.zeros(1, seq, dtype=torch.long)
    am = torch.ones(1, t, dtype=torch.long)
    pos = torch.arange(past, past + seq, dtype=torch.long)[None]
    cm = torch.tril(torch.ones(seq, t, dtype=torch.long), diagonal=past)[None, None]
    pkv = []
    for _ in range(layers):
        pkv += [torch.zeros(1, kv, past, hd, dtype=dtype), torch.zeros(1, kv, past, hd, dtype=dtype)]
    return (ids, am, pos, cm, *pkv)


def export_wrapper_onnx(model: nn.Module, path: str, *, seq: int, past: int, opset: int = 17,
                        dynamic: bool = True, external_data: bool = True,
                        table_len: int | None = None) -> None:
    """Trace KVCacheLM and save it. `dynamic` marks seq/past/total lengths symbolic so one file serves both the
    prefill (S=P) and the decode (S=1) engines; DeepSparse fixes them at compile time via input_shapes."""
    import onnx

    layers, _, _ = kv_geometry(model.config)
    wrapper = KVCacheLM(model, table_len).eval()
    args = dummy_inputs(model.config, seq, past, model.get_input_embeddings().weight.dtype)
    inputs, outputs = io_names(layers)
    dyn = None
    if dynamic:
        dyn = {"input_ids": {1: "seq"}, "attention_mask": {1: "total"}, "positions": {1: "seq"},
               "causal_mask": {2: "seq", 3: "total"}, "logits": {1: "seq"}}
        for i in range(layers):
            dyn[f"past_key_values.{i}.key"] = {2: "past"}
            dyn[f"past_key_values.{i}.value"] = {2: "past"}
            dyn[f"present.{i}.key"] = {2: "total"}
            dyn[f"present.{i}.value"] = {2: "total"}
    tmp = path + ".tmp.onnx"
    try:
        # The tracer warns about every Python-side shape check in transformers' cache code; the wrapper fixes those
        # paths on purpose, and the export is verified numerically afterwards, so the warnings only bury real output.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(wrapper, args, tmp, input_names=inputs, output_names=outputs, dynamic_axes=dyn,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    finally:
        wrapper.restore()
    m = onnx.load(tmp, load_external_data=True)
    import os
    from pathlib import Path

    if external_data:
        onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=Path(path).stem + ".data", size_threshold=1024)
    else:
        onnx.save_model(m, path)
    os.unlink(tmp)
