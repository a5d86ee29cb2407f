"""The `sparse-cpu` runtime: a Runner (see losa_deploy.runners) over the C executor in csrc/executor.c.

Why a C executor and not ONNX Runtime with a custom op: ONNX Runtime's C headers are not in its wheel, and eager
PyTorch spends several ms per token dispatching ops on the 135M model. Here one ctypes call runs every layer of a
decode step, so the per-token Python cost is a few microseconds next to the tens of MB of weights streamed.

Weights come as a flat {name: numpy array} dict plus a layout (one entry per block linear: kind, shape); the
export writes exactly that dict to model.sparse.safetensors. Python owns every array (weights, rotary tables, KV
cache); the C side only borrows pointers, so a Runner keeps its arrays alive for as long as it lives.
"""

from __future__ import annotations

import ctypes as C
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from losa_deploy.errors import UserError

from .abi import KINDS, SpMatrix

WEIGHTS_FILE = "model.sparse.safetensors"
FORMAT = "sparse-cpu"
LAYOUT_KEY = "losa_sparse_cpu_layout"
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # static inverse frequencies (+ attention factor for yarn)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LM_HEAD_MODES = ("auto", "c", "torch")


# ------------------------------------------------------------------------------------------------ ctypes
class SpxLayer(C.Structure):
    """Mirror of spx_layer in executor.h."""

    _fields_ = [("attn_norm", C.c_void_p), ("mlp_norm", C.c_void_p), ("q_bias", C.c_void_p), ("k_bias", C.c_void_p),
                ("v_bias", C.c_void_p), ("fused_qkv", C.c_int32), ("fused_gate_up", C.c_int32),
                ("q", SpMatrix), ("k", SpMatrix), ("v", SpMatrix), ("o", SpMatrix), ("gate", SpMatrix),
                ("up", SpMatrix), ("down", SpMatrix)]


class SpxModel(C.Structure):
    """Mirror of spx_model in executor.h."""

    _fields_ = [("n_layers", C.c_int64), ("hidden", C.c_int64), ("inter", C.c_int64), ("n_heads", C.c_int64),
                ("n_kv_heads", C.c_int64), ("head_dim", C.c_int64), ("vocab", C.c_int64), ("max_len", C.c_int64),
                ("max_tokens", C.c_int64), ("rms_eps", C.c_float), ("attn_scale", C.c_float),
                ("embed", C.c_void_p), ("final_norm", C.c_void_p), ("rope_cos", C.c_void_p), ("rope_sin", C.c_void_p),
                ("layers", C.POINTER(SpxLayer)), ("lm_head", SpMatrix), ("k_cache", C.c_void_p),
                ("v_cache", C.c_void_p)]


SPX_ABI_VERSION = 2
PHASES = ("linear", "attention", "norm_rope_act", "lm_head", "total")

_LIB: Any = None


def clib() -> Any:
    """The compiled kernel + executor library (built by sparse_cpu.toolchain through sparse_cpu._lib), typed once."""
    global _LIB
    if _LIB is not None:
        return _LIB
    from . import _lib

    lib = _lib.load()
    lib.spx_abi_version.restype = C.c_int
    if lib.spx_abi_version() != SPX_ABI_VERSION:
        raise UserError("the sparse-cpu library is out of date (executor ABI); rebuild it: "
                        "python -m losa_deploy.sparse_cpu.build")
    lib.spx_create.restype = C.c_void_p
    lib.spx_create.argtypes = [C.POINTER(SpxModel)]
    lib.spx_free.argtypes = [C.c_void_p]
    lib.spx_forward.restype = C.c_int
    lib.spx_forward.argtypes = [C.c_void_p, C.c_void_p, C.c_int64, C.c_int64, C.c_void_p, C.c_void_p, C.c_int32]
    lib.spx_last_error.restype = C.c_char_p
    lib.spx_set_profile.argtypes = [C.c_void_p, C.c_int32]
    lib.spx_read_profile.argtypes = [C.c_void_p, C.POINTER(C.c_double)]
    lib.sp_set_threads.argtypes = [C.c_int]
    lib.sp_get_threads.restype = C.c_int
    lib.sp_get_isa.restype = C.c_int
    _LIB = lib
    return lib


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


# ------------------------------------------------------------------------------------------- model checks
def check_supported(config: Any, max_len: int | None = None) -> None:
    """One-line UserError naming what the executor lacks for this config (architecture, biases, RoPE, window)."""
    mt = getattr(config, "model_type", None)
    what = "--runtime/--format sparse-cpu"
    if mt not in SUPPORTED_TYPES:
        raise UserError(f"{what} runs Llama-family decoders ({', '.join(SUPPORTED_TYPES)}), not '{mt}'")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{what} supports the SiLU gated MLP, not hidden_act='{act}'")
    if getattr(config, "mlp_bias", False):
        raise UserError(f"{what} does not implement MLP biases (mlp_bias=true)")
    if mt == "llama" and getattr(config, "attention_bias", False):
        raise UserError(f"{what} does not implement the o_proj bias of attention_bias=true")
    rs = getattr(config, "rope_scaling", None) or {}
    rt = rs.get("rope_type", rs.get("type", "default")) if isinstance(rs, dict) else "default"
    if rt not in ROPE_TYPES:
        raise UserError(f"{what} does not implement rope_scaling type '{rt}' (supported: {', '.join(ROPE_TYPES)})")
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and (mt == "mistral" or getattr(config, "use_sliding_window", False))
    if uses_window and max_len is not None and max_len > int(window):
        raise UserError(f"{what} does not implement sliding-window attention: use --max-len <= {window} "
                        "(the window then never applies)")
    hd = head_dim(config)
    if hd % 2:
        raise UserError(f"{what} needs an even head_dim for RoPE, got {hd}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise UserError(f"{what}: num_attention_heads must be a multiple of num_key_value_heads")


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def num_kv_heads(config: Any) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def rope_tables(config: Any, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_len, head_dim/2] fp32, computed with transformers' own RoPE init and ops (bit-identical)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rs = getattr(config, "rope_scaling", None) or {}
    rt = rs.get("rope_type", rs.get("type", "default")) if isinstance(rs, dict) else "default"
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rt](config, "cpu")
    pos = torch.arange(max_len, dtype=torch.float32)
    freqs = (inv_freq[None, :, None].float() @ pos[None, None, :]).transpose(1, 2)[0]  # [max_len, hd/2]
    cos = (freqs.cos() * scaling).float().numpy()
    sin = (freqs.sin() * scaling).float().numpy()
    return np.ascontiguousarray(cos), np.ascontiguousarray(sin)


# ------------------------------------------------------------------------------------------------- packing
def pack_linear(w: np.ndarray, keep: np.ndarray | None, kind: str, n: int = 0, m: int = 0) -> dict[str, np.ndarray]:
    """Arrays of one linear in the kernels' layout (sparse_cpu.pack): "weight" for dense, else "masks", "row_ptr",
    "values" (kept values + pack.VALUE_PAD zeros). `keep` is the explicit mask; zeros in `w` never decide."""
    from .pack import pack_bitmask, pack_nm

    w = np.ascontiguousarray(w, dtype=np.float32)
    if kind == "dense":
        return {"weight": w}
    p = pack_nm(w, keep, n, m) if kind == "nm" else pack_bitmask(w, keep)
    return {"masks": p.masks, "row_ptr": p.row_ptr, "values": p.values}


def unpack_keep(masks: np.ndarray, cols: int) -> np.ndarray:
    """The keep mask [rows, cols] a packed matrix encodes (bit b of masks[r, g] is column 16 g + b)."""
    from .pack import mask_from_bits

    return mask_from_bits(masks, cols)


def unpack_dense(arrs: dict[str, np.ndarray], rows: int, cols: int) -> np.ndarray:
    """The dense [rows, cols] matrix a packed linear encodes (zeros where the mask drops)."""
    if "weight" in arrs:
        return arrs["weight"]
    keep = unpack_keep(arrs["masks"], cols)
    w = np.zeros((rows, cols), np.float32)
    w[keep] = arrs["values"][: int(arrs["row_ptr"][-1])]
    return w


def nm_of(keep: np.ndarray) -> tuple[int, int] | None:
    """(N, M) when every group of M consecutive inputs keeps exactly N (M in 4, 8), read from the explicit mask."""
    rows, cols = keep.shape
    for m in (4, 8):
        if cols % m == 0:
            counts = keep.reshape(rows, cols // m, m).sum(-1)
            n = int(counts.flat[0]) if counts.size else 0
            if 0 < n < m and bool((counts == n).all()):
                return n, m
    return None


@dataclass
class Packed:
    """A whole model in the executor's layout: tensors (the safetensors content) + layout (per block linear)."""

    tensors: dict[str, np.ndarray]
    layout: dict[str, dict]
    config: Any
    notes: list[str] = field(default_factory=list)

    def weight_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.tensors.values()))

    def linear(self, name: str) -> dict[str, np.ndarray]:
        kind = self.layout[name]["kind"]
        keys = ("weight",) if kind == "dense" else ("masks", "row_ptr", "values")
        return {k: self.tensors[f"{name}.{k}"] for k in keys}


def choose_kind(keep: np.ndarray | None, min_sparsity: float) -> tuple[str, int, int]:
    """(kind, n, m) for one linear: dense below min_sparsity (a bitmask there costs more than it saves)."""
    if keep is None:
        return "dense", 0, 0
    s = 1.0 - float(keep.sum()) / keep.size
    if s < min_sparsity:
        return "dense", 0, 0
    nm = nm_of(keep)
    if nm:
        return "nm", nm[0], nm[1]
    return "bitmask", 0, 0


def block_linear_names(config: Any) -> list[str]:
    return [f"model.layers.{i}.{grp}.{p}" for i in range(config.num_hidden_layers)
            for grp, projs in (("self_attn", ATTN), ("mlp", MLP)) for p in projs]


def pack_model(state: dict[str, np.ndarray], config: Any, masks: dict[str, np.ndarray] | None, *,
               min_sparsity: float = 0.2) -> Packed:
    """Pack an fp32 Llama-family state dict ({HF name: array}) with its explicit keep-masks ({weight name: bool}).

    masks=None packs every linear dense (a checkpoint without sparsity_masks.safetensors); a linear missing from
    `masks` is dense too. Unexpected parameters (biases the executor lacks, extra norms) are a UserError."""
    check_supported(config)
    lin = set(block_linear_names(config))
    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, dict] = {}
    notes: list[str] = []
    expected_other = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(config.num_hidden_layers):
        expected_other |= {f"model.layers.{i}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
        if config.model_type == "qwen2":
            expected_other |= {f"model.layers.{i}.self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")}
    unexpected = sorted(k for k in state if k not in expected_other and k[: -len(".weight")] not in lin)
    if unexpected:
        raise UserError(f"--format sparse-cpu does not implement parameter '{unexpected[0]}' "
                        f"({len(unexpected)} unsupported tensors)")
    missing = sorted(n for n in lin if f"{n}.weight" not in state)
    if missing:
        raise UserError(f"--format sparse-cpu: checkpoint lacks '{missing[0]}.weight'")
    if masks is None:
        notes.append("no sparsity_masks.safetensors: every linear packed dense")
    for name in block_linear_names(config):
        w = np.ascontiguousarray(state[f"{name}.weight"], dtype=np.float32)
        keep = None if masks is None else masks.get(f"{name}.weight")
        if keep is not None and keep.shape != w.shape:
            raise UserError(f"sparsity mask of '{name}' has shape {list(keep.shape)}, weight {list(w.shape)}")
        kind, n, m = choose_kind(keep, min_sparsity)
        arrs = pack_linear(w if keep is None or kind != "dense" else np.where(keep, w, 0).astype(np.float32), keep,
                           kind, n, m)
        for k, a in arrs.items():
            tensors[f"{name}.{k}"] = a
        layout[name] = {"kind": kind, "rows": int(w.shape[0]), "cols": int(w.shape[1]), "n": n, "m": m,
                        "dtype": "float32",
                        "sparsity": round(1.0 - float(keep.sum()) / keep.size, 6) if keep is not None else 0.0}
    for k in sorted(expected_other & set(state)):
        if k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # tied: the embedding matrix serves as lm_head (stored once)
        tensors[k] = np.ascontiguousarray(state[k], dtype=np.float32)
    if not getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in tensors:
        raise UserError("--format sparse-cpu: untied model without lm_head.weight")
    return Packed(tensors, layout, config, notes)


def packed_from_model(model: Any, masks: dict[str, np.ndarray] | None, min_sparsity: float = 0.2) -> Packed:
    """Pack an in-memory transformers model (fp32)."""
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return pack_model(state, model.config, masks, min_sparsity=min_sparsity)


def save_packed(p: Packed, path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(p.tensors, str(path), metadata={LAYOUT_KEY: json.dumps(p.layout), "format": FORMAT})


def load_packed(export_dir: Path) -> Packed:
    """Read an export directory (model.sparse.safetensors + config.json)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    d = Path(export_dir)
    f = d / WEIGHTS_FILE
    if not f.is_file():
        raise UserError(f"'{d}' has no {WEIGHTS_FILE}; run: losa-deploy export MODEL_DIR --format sparse-cpu")
    try:
        config = AutoConfig.from_pretrained(str(d))
        with safe_open(str(f), framework="numpy") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the sparse-cpu export in '{d}': {str(e).splitlines()[0][:160]}")
    if LAYOUT_KEY not in meta:
        raise UserError(f"'{f}' has no sparse-cpu layout metadata; re-export with --format sparse-cpu")
    return Packed(tensors, json.loads(meta[LAYOUT_KEY]), config)


def resolve_export_dir(path: Path) -> Path:
    """The sparse-cpu export for `path`: the export dir itself, or `<model dir>/sparse-cpu`."""
    for cand in (path, path / FORMAT):
        if (cand / WEIGHTS_FILE).is_file():
            return cand
    raise UserError(f"'{path}' has no sparse-cpu export ({WEIGHTS_FILE}); "
                    f"run: losa-deploy export {path} --format sparse-cpu")


# ------------------------------------------------------------------------------------------------- runner
def _concat_rows(parts: list[dict[str, np.ndarray]], kinds: list[str]) -> dict[str, np.ndarray] | None:
    """Stack the rows of several packed linears of one kind into one matrix (one kernel call instead of several)."""
    if len(set(kinds)) != 1:
        return None
    if kinds[0] == "dense":
        return {"weight": np.concatenate([p["weight"] for p in parts], axis=0)}
    from .pack import VALUE_PAD

    offs, rp = 0, [np.zeros(1, np.int64)]
    for p in parts:
        rp.append(p["row_ptr"][1:] + offs)
        offs += int(p["row_ptr"][-1])
    vals = [p["values"][: int(p["row_ptr"][-1])] for p in parts] + [np.zeros(VALUE_PAD, np.float32)]
    return {"masks": np.ascontiguousarray(np.concatenate([p["masks"] for p in parts], axis=0)),
            "row_ptr": np.concatenate(rp).astype(np.int64), "values": np.concatenate(vals)}


class SparseCpuRunner:
    """Runner over the C executor: prefill(ids[1, P]) -> logits [1, P, V], decode(id) -> logits [V], reset().

    lm_head (dense [vocab, hidden]): "c" computes logits with the library's dense kernel, "torch" hands the final
    hidden states to torch.nn.functional.linear (MKL), "auto" (default) uses the C kernel for one token (decode:
    memory-bound, no second thread pool) and torch for a prefill chunk (compute-bound, where MKL's GEMM is faster);
    measured in docs/measured/sparse-runtime.md."""

    name = "sparse-cpu"

    def __init__(self, packed: Packed, *, prefill_len: int = 128, max_len: int = 512, threads: int | None = None,
                 lm_head: str = "auto", fuse: bool = True) -> None:
        from losa_deploy.graph_contract import default_threads

        if prefill_len < 1 or max_len <= prefill_len:
            raise UserError(f"need 1 <= prefill_len < max_len (got prefill_len={prefill_len}, max_len={max_len})")
        if lm_head not in LM_HEAD_MODES:
            raise UserError(f"lm_head must be one of {', '.join(LM_HEAD_MODES)}, got '{lm_head}'")
        cfg = packed.config
        check_supported(cfg, max_len)
        self.packed = packed
        self.config = cfg
        self.prefill_len = int(prefill_len)
        self.max_len = int(max_len)
        self.threads = int(threads or default_threads())
        if self.threads < 1:
            raise UserError(f"--threads must be >= 1 (got {self.threads})")
        self.lm_head_mode = lm_head
        self.lib = clib()
        self._keep: list[Any] = []  # every array / struct the C side points into
        t = packed.tensors
        self.vocab, self.hidden = (int(s) for s in t["model.embed_tokens.weight"].shape)
        self.n_layers = int(cfg.num_hidden_layers)
        self.head_dim, self.kv_heads = head_dim(cfg), num_kv_heads(cfg)
        cos, sin = rope_tables(cfg, self.max_len)
        # K transposed ([head_dim][max_len] per head): the executor scores consecutive keys in SIMD lanes
        self.k_cache = np.zeros((self.n_layers, self.kv_heads, self.head_dim, self.max_len), np.float32)
        self.v_cache = np.zeros((self.n_layers, self.kv_heads, self.max_len, self.head_dim), np.float32)
        self._keep += [cos, sin]
        layers = (SpxLayer * self.n_layers)()
        self.fused = {"qkv": 0, "gate_up": 0}
        for i in range(self.n_layers):
            self._fill_layer(layers[i], i, fuse)
        embed = self._f32(t["model.embed_tokens.weight"])
        head = self._f32(t.get("lm_head.weight", embed))
        self.lm_head_weight = head
        m = SpxModel()
        m.n_layers, m.hidden, m.inter = self.n_layers, self.hidden, int(cfg.intermediate_size)
        m.n_heads, m.n_kv_heads, m.head_dim = int(cfg.num_attention_heads), self.kv_heads, self.head_dim
        m.vocab, m.max_len, m.max_tokens = self.vocab, self.max_len, self.prefill_len
        m.rms_eps = float(cfg.rms_norm_eps)
        m.attn_scale = float(self.head_dim) ** -0.5
        m.embed, m.final_norm = _ptr(embed), _ptr(self._f32(t["model.norm.weight"]))
        m.rope_cos, m.rope_sin = _ptr(cos), _ptr(sin)
        m.layers = layers
        if lm_head in ("c", "auto"):
            m.lm_head = self._matrix({"weight": head}, "dense", self.vocab, self.hidden)
        m.k_cache, m.v_cache = _ptr(self.k_cache), _ptr(self.v_cache)
        self._layers, self._model = layers, m
        self._ctx = self.lib.spx_create(C.byref(m))
        if not self._ctx:
            raise UserError(f"sparse-cpu executor rejected the model: {self.lib.spx_last_error().decode()}")
        self._hidden = np.zeros((self.prefill_len, self.hidden), np.float32)
        self._logits1 = np.zeros(self.vocab, np.float32)
        if lm_head in ("torch", "auto"):
            import torch

            self._torch_head = torch.from_numpy(head)
        self.pos = 0

    # ---- struct filling
    def _f32(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=np.float32)
        self._keep.append(a)
        return a

    def _matrix(self, arrs: dict[str, np.ndarray], kind: str, rows: int, cols: int, n: int = 0,
                m: int = 0) -> SpMatrix:
        mat = SpMatrix(rows=rows, cols=cols, kind=KINDS[kind], dtype=0, n=n, m=m)
        if kind == "dense":
            mat.values = _ptr(self._f32(arrs["weight"]))
        else:
            from .pack import VALUE_PAD

            masks = np.ascontiguousarray(arrs["masks"], dtype=np.uint16)
            rp = np.ascontiguousarray(arrs["row_ptr"], dtype=np.int64)
            if masks.shape != (rows, -(-cols // 16)) or rp.shape != (rows + 1,):
                raise UserError(f"packed matrix {rows}x{cols}: masks {list(masks.shape)} / row_ptr {list(rp.shape)} "
                                "do not match; re-export with --format sparse-cpu")
            vals = arrs["values"]
            nnz = int(rp[-1])
            if vals.shape[0] < nnz + VALUE_PAD:  # the kernels may read up to VALUE_PAD floats past the last value
                vals = np.concatenate([vals[:nnz], np.zeros(VALUE_PAD, np.float32)])
            vals = self._f32(vals)
            self._keep += [masks, rp]
            mat.masks, mat.row_ptr, mat.values = _ptr(masks), _ptr(rp), _ptr(vals)
        return mat

    def _lin(self, name: str) -> tuple[dict[str, np.ndarray], dict]:
        return self.packed.linear(name), self.packed.layout[name]

    def _fill_group(self, L: SpxLayer, prefix: str, projs: tuple[str, ...], slots: tuple[str, ...], fuse: bool) -> int:
        parts = [self._lin(f"{prefix}.{p}") for p in projs]
        kinds = [lay["kind"] for _, lay in parts]
        nms = {(lay["n"], lay["m"]) for _, lay in parts}
        fused = _concat_rows([a for a, _ in parts], kinds) if fuse and len(nms) == 1 else None
        if fused is not None:
            lay = parts[0][1]
            rows = sum(lay2["rows"] for _, lay2 in parts)
            setattr(L, slots[0], self._matrix(fused, kinds[0], rows, lay["cols"], lay["n"], lay["m"]))
            return 1
        for slot, (arrs, lay) in zip(slots, parts):
            setattr(L, slot, self._matrix(arrs, lay["kind"], lay["rows"], lay["cols"], lay["n"], lay["m"]))
        return 0

    def _fill_layer(self, L: SpxLayer, i: int, fuse: bool) -> None:
        t = self.packed.tensors
        pre = f"model.layers.{i}"
        L.attn_norm = _ptr(self._f32(t[f"{pre}.input_layernorm.weight"]))
        L.mlp_norm = _ptr(self._f32(t[f"{pre}.post_attention_layernorm.weight"]))
        for p, slot in (("q_proj", "q_bias"), ("k_proj", "k_bias"), ("v_proj", "v_bias")):
            b = t.get(f"{pre}.self_attn.{p}.bias")
            if b is not None:
                setattr(L, slot, _ptr(self._f32(b)))
        L.fused_qkv = self._fill_group(L, f"{pre}.self_attn", ATTN[:3], ("q", "k", "v"), fuse)
        L.o = self._matrix(*self._lin_args(f"{pre}.self_attn.o_proj"))
        L.fused_gate_up = self._fill_group(L, f"{pre}.mlp", MLP[:2], ("gate", "up"), fuse)
        L.down = self._matrix(*self._lin_args(f"{pre}.mlp.down_proj"))
        self.fused["qkv"] += L.fused_qkv
        self.fused["gate_up"] += L.fused_gate_up

    def _lin_args(self, name: str) -> tuple:
        arrs, lay = self._lin(name)
        return arrs, lay["kind"], lay["rows"], lay["cols"], lay["n"], lay["m"]

    # ---- running
    def _forward(self, ids: np.ndarray, logits: np.ndarray | None, last_only: bool = False) -> np.ndarray | None:
        n = ids.shape[0]
        self.lib.sp_set_threads(self.threads)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        rows = 1 if last_only else n
        hidden = self._hidden[:rows]
        use_c_head = self.lm_head_mode == "c" or (self.lm_head_mode == "auto" and rows == 1)
        rc = self.lib.spx_forward(self._ctx, ids.ctypes.data, n, self.pos,
                                  None if use_c_head else hidden.ctypes.data,
                                  logits.ctypes.data if (use_c_head and logits is not None) else None,
                                  1 if last_only else 0)
        if rc:
            msg = self.lib.spx_last_error().decode()
            if rc == -4:
                raise UserError(f"sequence longer than max_len={self.max_len} tokens; use a larger --max-len")
            if rc == -5:
                raise UserError(f"token id outside the vocabulary ({self.vocab})")
            raise RuntimeError(f"sparse-cpu executor failed ({rc}): {msg}")
        self.pos += n
        if not use_c_head and logits is not None:
            import torch

            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
            torch.nn.functional.linear(torch.from_numpy(hidden), self._torch_head, out=torch.from_numpy(logits))
        return logits

    def reset(self) -> None:
        self.pos = 0  # cache rows past pos are never read

    def prefill(self, ids: Any) -> np.ndarray:
        from losa_deploy.graph_contract import as_ids as _as_ids, check_prompt_fits

        a = _as_ids(ids)
        P = a.shape[1]
        check_prompt_fits(P, self.max_len)
        self.reset()
        out = np.empty((1, P, self.vocab), np.float32)
        for s in range(0, P, self.prefill_len):
            chunk = a[0, s:s + self.prefill_len]
            self._forward(chunk, out[0, s:s + len(chunk)])
        return out

    def decode(self, token_id: int) -> np.ndarray:
        if self.pos >= self.max_len:
            raise UserError(f"generation reached max_len={self.max_len} tokens; use a larger --max-len")
        out = np.empty(self.vocab, np.float32)
        self._forward(np.array([int(token_id)], np.int64), out[None])
        return out

    def profile(self, on: bool = True) -> None:
        """Start (or stop) accumulating per-phase executor time; read it with read_profile()."""
        self.lib.spx_set_profile(self._ctx, 1 if on else 0)

    def read_profile(self) -> dict[str, float]:
        buf = (C.c_double * len(PHASES))()
        self.lib.spx_read_profile(self._ctx, buf)
        return dict(zip(PHASES, list(buf)))

    def describe(self) -> dict:
        """What the runner runs (for manifests and bench reports)."""
        kinds: dict[str, int] = {}
        for lay in self.packed.layout.values():
            kinds[lay["kind"]] = kinds.get(lay["kind"], 0) + 1
        return {"runtime": self.name, "threads": self.threads, "isa": isa_name(self.lib.sp_get_isa()),
                "lm_head": self.lm_head_mode, "linears": kinds, "fused": dict(self.fused),
                "weight_bytes": self.packed.weight_bytes()}

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self.lib.spx_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def isa_name(code: int) -> str:
    return {0: "portable", 1: "avx2", 2: "avx512"}.get(int(code), f"isa{code}")


def open_runner(path: str | Path, *, prefill_len: int = 128, max_len: int = 512, threads: int | None = None,
                lm_head: str = "auto") -> SparseCpuRunner:
    """A Runner on a sparse-cpu export directory (or a model dir that contains sparse-cpu/)."""
    d = resolve_export_dir(Path(path))
    packed = load_packed(d)
    return SparseCpuRunner(packed, prefill_len=prefill_len, max_len=max_len, threads=threads, lm_head=lm_head)
