"""One small API over every runtime, so generation and benchmarks code against a single shape of object.

`make_runner(path, runtime, prefill_len=, max_len=)` returns a Runner:
  prefill(ids[1, P]) -> logits[1, P, V]   starts a new sequence (P <= max_len - 1; chunks of prefill_len internally)
  decode(token_id)   -> logits[V]         appends one token
  reset(), name, threads
`open_generation(path, runtime)` adds the tokenizer and the export's shapes; `generate(runner, tokenizer, prompt)`
decodes greedily through any Runner (what `losa-deploy generate` prints).

"sparse-cpu" runs the packed export of `export --format sparse-cpu` on the C executor in losa_deploy/sparse_cpu
(whole model per call, its own KV cache; prefill in chunks of prefill_len).

"onnxruntime" and "deepsparse" run the SAME deepsparse-format model.onnx with the same static shapes
(a prefill call of exactly `prefill_len` tokens and a decode call of 1 token, total length `max_len`) and the same
thread count: the fair sparse-vs-dense comparison. Their KV cache is a fixed-length, right-aligned buffer: each
call feeds the last (max_len - seq) slots as past and gets max_len slots back, the oldest slot falls off, and a
validity vector (the attention_mask) masks slots that never held a real token (DeepSparse's own scheme).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .artifact import EXPORT_MANIFEST_NAME, check_masks, read_export_manifest
from .errors import UserError
from .graph_contract import as_ids as _as_ids, default_threads  # noqa: F401 (default_threads: public here too)
from .graph_contract import check_prompt_fits, engine_shapes, kv_geometry, static_graph_copy

RUNTIMES = ("torch", "onnxruntime", "deepsparse", "torch-2of4", "sparse-cpu")


class Runner(Protocol):
    name: str
    threads: int
    prefill_len: int
    max_len: int

    def prefill(self, ids: np.ndarray) -> np.ndarray: ...
    def decode(self, token_id: int) -> np.ndarray: ...
    def reset(self) -> None: ...


# --------------------------------------------------------------------------------------------- fixed-shape ONNX
class _FixedShapeKVRunner:
    """Shared cache bookkeeping for ORT and DeepSparse on the wrapper-traced graph (see exporters/wrapper.py)."""

    name = "base"

    def __init__(self, onnx_path: Path, config: Any, prefill_len: int, max_len: int, threads: int) -> None:
        if prefill_len < 1 or max_len <= prefill_len:
            raise UserError(f"need 1 <= prefill_len < max_len (got prefill_len={prefill_len}, max_len={max_len})")
        self.onnx_path = Path(onnx_path)
        self.config = config
        self.prefill_len = int(prefill_len)
        self.max_len = int(max_len)
        self.threads = int(threads)
        self.layers, self.kv_heads, self.head_dim = kv_geometry(config)
        self.dtype = np.float32
        self.pad_id = 0  # left-padding slots are masked out (attention_mask 0), so any valid id works
        self.reset()

    # engine call: seq new tokens -> (logits [1, seq, V], presents list of [1, kv, max_len, hd])
    def _run(self, seq: int, feeds: list[np.ndarray]) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:
        shape = (1, self.kv_heads, self.max_len, self.head_dim)
        self.cache = [np.zeros(shape, dtype=self.dtype) for _ in range(2 * self.layers)]
        self.valid = np.zeros(self.max_len, dtype=np.int64)
        self.pos = 0

    def _step(self, ids: np.ndarray, seq: int) -> np.ndarray:
        """Feed `ids` (n <= seq real tokens, left-padded to seq) and return their logits [n, V]."""
        n = ids.shape[1]
        past_len = self.max_len - seq
        if int(self.valid[:seq].sum()) > 0:  # the slots about to fall off still hold real tokens
            raise UserError(f"sequence longer than max_len={self.max_len} tokens; export/run with a larger --max-len")
        pad = seq - n
        input_ids = np.full((1, seq), self.pad_id, dtype=np.int64)
        input_ids[0, pad:] = ids[0]
        positions = np.zeros((1, seq), dtype=np.int64)
        positions[0, pad:] = np.arange(self.pos, self.pos + n)
        new_valid = np.concatenate([self.valid[seq:], np.r_[np.zeros(pad, np.int64), np.ones(n, np.int64)]])
        attention_mask = new_valid[None].astype(np.int64)
        causal = np.tril(np.ones((seq, self.max_len), dtype=np.int64), k=past_len)[None, None]
        feeds = [input_ids, attention_mask, positions, causal] + [
            np.ascontiguousarray(c[:, :, seq:, :]) for c in self.cache
        ]
        outs = self._run(seq, feeds)
        self.cache = [np.ascontiguousarray(o) for o in outs[1:]]
        self.valid = new_valid
        self.pos += n
        return outs[0][0, pad:]

    def prefill(self, ids: Any) -> np.ndarray:
        ids = _as_ids(ids)
        check_prompt_fits(ids.shape[1], self.max_len)
        self.reset()
        outs = []
        for start in range(0, ids.shape[1], self.prefill_len):
            outs.append(self._step(ids[:, start:start + self.prefill_len], self.prefill_len))
        return np.concatenate(outs, axis=0)[None]

    def decode(self, token_id: int) -> np.ndarray:
        if self.pos >= self.max_len:
            raise UserError(f"generation reached max_len={self.max_len} tokens; use a larger --max-len")
        return self._step(np.array([[int(token_id)]], dtype=np.int64), 1)[0]


class OrtRunner(_FixedShapeKVRunner):
    name = "onnxruntime"

    def __init__(self, onnx_path: Path, config: Any, prefill_len: int, max_len: int, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        super().__init__(onnx_path, config, prefill_len, max_len, threads)

    def _run(self, seq: int, feeds: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self.input_names, feeds)))


class DeepSparseRunner(_FixedShapeKVRunner):
    """Two engines compiled from one model.onnx: prefill (seq = prefill_len) and decode (seq = 1).

    The decode engine is compiled on first use (or by `ensure_decode()`): a compile takes tens of seconds, and a
    prefill-only measurement never needs it."""

    name = "deepsparse"

    def __init__(self, onnx_path: Path, config: Any, prefill_len: int, max_len: int, threads: int) -> None:
        self._deepsparse = require_deepsparse()
        self._tmp = tempfile.TemporaryDirectory(prefix="losa-ds-")
        self._graphs = {
            seq: static_graph_copy(str(onnx_path), self._tmp.name, label, engine_shapes(config, seq, max_len))
            for seq, label in ((prefill_len, "prefill"), (1, "decode"))
        }
        self.engines: dict[int, Any] = {}
        self._engine(prefill_len, threads)
        super().__init__(onnx_path, config, prefill_len, max_len, threads)

    def _engine(self, seq: int, threads: int | None = None) -> Any:
        if seq not in self.engines:
            self.engines[seq] = self._deepsparse.Engine(self._graphs[seq], batch_size=1,
                                                        num_cores=threads if threads is not None else self.threads)
        return self.engines[seq]

    def ensure_decode(self) -> None:
        """Compile the decode engine now (so that a timed phase does not include the compile)."""
        self._engine(1)

    def _run(self, seq: int, feeds: list[np.ndarray]) -> list[np.ndarray]:
        return self._engine(seq).run(feeds)


def require_deepsparse() -> Any:
    try:
        import deepsparse  # noqa: F401
    except Exception as e:  # ImportError, or a binary that does not load on this CPU/OS
        raise UserError(
            f"DeepSparse is not available ({type(e).__name__}): it needs Linux x86-64 and Python 3.8-3.11: "
            "pip install deepsparse==1.8.0 (end-of-life, community licence: evaluation use only)"
        )
    return deepsparse


# --------------------------------------------------------------------------------------------------- torch
class TorchRunner:
    """The HF model in PyTorch with its own KV cache (eager reference for parity and the dense baseline)."""

    def __init__(
        self, model: Any, name: str, prefill_len: int, max_len: int, threads: int, device: str = "cpu"
    ) -> None:
        self.model = model
        self.name = name
        self.prefill_len = int(prefill_len)
        self.max_len = int(max_len)
        self.threads = int(threads)
        self.device = device
        self.past = None
        self.pos = 0

    def reset(self) -> None:
        self.past = None
        self.pos = 0

    def _forward(self, ids: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.pos += ids.shape[1]
        return out.logits.float().cpu().numpy()

    def prefill(self, ids: Any) -> np.ndarray:
        import torch

        a = _as_ids(ids)
        check_prompt_fits(a.shape[1], self.max_len)
        self.reset()
        return self._forward(torch.from_numpy(a))

    def decode(self, token_id: int) -> np.ndarray:
        import torch

        if self.pos >= self.max_len:
            raise UserError(f"generation reached max_len={self.max_len} tokens; use a larger --max-len")
        return self._forward(torch.tensor([[int(token_id)]]))[0, -1]


def is_2of4(w: Any) -> bool:
    """True when every group of 4 consecutive inputs (dim 1) of a 2-D weight has at most 2 non-zeros."""
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def swap_2of4(model: Any, min_dim: int = 64) -> list[str]:
    """Replace 2:4-sparse linear weights (fp16/bf16 on CUDA) by semi-structured sparse tensors (cuSPARSELt/CUTLASS)."""
    import torch
    import torch.nn as nn
    from torch.sparse import to_sparse_semi_structured

    swapped = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and "lm_head" not in name:
            w = mod.weight.data
            if min(w.shape) >= min_dim and w.shape[0] % 64 == 0 and w.shape[1] % 64 == 0 and is_2of4(w):
                mod.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
                swapped.append(name)
    torch.cuda.synchronize()
    return swapped


# ------------------------------------------------------------------------------------------------ factory
def resolve_onnx_dir(path: Path) -> Path:
    """The deepsparse-format export for `path`: the export dir itself, or `<model dir>/deepsparse`."""
    for cand in (path, path / "deepsparse"):
        if (cand / "model.onnx").is_file() and read_export_manifest(cand).get("format") == "deepsparse":
            return cand
    raise UserError(
        f"'{path}' has no deepsparse-format export (model.onnx + {EXPORT_MANIFEST_NAME}); "
        f"run: losa-deploy export {path} --format deepsparse"
    )


def resolve_hf_dir(path: Path) -> Path:
    """The HF checkpoint for `path`: the dir itself, or the source recorded in its export manifest."""
    man = read_export_manifest(path)
    if man.get("format") == "compressed-tensors" and man.get("source") and Path(man["source"]).is_dir():
        return Path(man["source"])  # transformers cannot from_pretrained every compressed-tensors sparse format
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if (path / "config.json").is_file() and has_weights:
        return path
    src = man.get("source")
    if src and Path(src).is_dir():
        return Path(src)
    raise UserError(f"'{path}' is not a Hugging Face model directory (config.json + *.safetensors)")


def make_runner(path: str | os.PathLike, runtime: str, *, prefill_len: int = 128, max_len: int = 512,
                threads: int | None = None, device: str = "cpu") -> Any:
    """Build a Runner for `runtime` on the model (or export) at `path`; see the module docstring."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"'{path}' not found")
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime '{runtime}': use one of {', '.join(RUNTIMES)}")
    if prefill_len < 1 or max_len <= prefill_len:
        raise UserError(f"need 1 <= prefill_len < max_len (got {prefill_len}, {max_len})")
    threads = int(threads or default_threads())
    if threads < 1:
        raise UserError(f"--threads must be >= 1 (got {threads})")
    if runtime == "sparse-cpu":
        if device != "cpu":
            raise UserError(f"runtime 'sparse-cpu' runs on the CPU; drop --device {device}")
        from .sparse_cpu.runtime import open_runner

        return open_runner(p, prefill_len=prefill_len, max_len=max_len, threads=threads)
    if runtime in ("onnxruntime", "deepsparse"):
        if device != "cpu":
            raise UserError(f"runtime '{runtime}' runs on the CPU; drop --device {device}")
        from transformers import AutoConfig

        d = resolve_onnx_dir(p)
        cfg = AutoConfig.from_pretrained(str(d))
        man = read_export_manifest(d)
        table = man.get("rotary_table_len")
        if table and max_len > table:
            raise UserError(
                f"max_len={max_len} exceeds the export's position table ({table}); re-export with --max-len {max_len}"
            )
        cls = OrtRunner if runtime == "onnxruntime" else DeepSparseRunner
        return cls(d / "model.onnx", cfg, prefill_len, max_len, threads)
    import torch

    from .models import load_model

    hf = resolve_hf_dir(p)
    if runtime == "torch-2of4":
        if not (device.startswith("cuda") and torch.cuda.is_available()):
            raise UserError(
                "runtime torch-2of4 needs a CUDA GPU (sparse tensor cores): pass --device cuda on a GPU machine"
            )
        model, _ = load_model(str(hf), dtype="float16", device=device)
        swapped = swap_2of4(model)
        if not swapped:
            raise UserError(f"'{hf}' has no 2:4-sparse linear layers to accelerate; export/prune with a 2:4 pattern")
        r = TorchRunner(model, "torch-2of4", prefill_len, max_len, threads, device)
        r.swapped = swapped  # type: ignore[attr-defined]
        return r
    if device == "cpu":
        torch.set_num_threads(threads)
    model, _ = load_model(str(hf), dtype="float32", device=device)
    return TorchRunner(model, "torch", prefill_len, max_len, threads, device)


def open_generation(path: str | os.PathLike, runtime: str, *, prefill_len: int | None = None,
                    max_len: int | None = None, threads: int | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """The Runner and the tokenizer for `generate` on the model (or export) at `path`.

    An export's own shapes are the defaults (else 128 and 512); a checkpoint the torch runner loads must agree with
    its masks first."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise UserError(f"'{path}' not found")
    pl, ml = prefill_len, max_len
    if runtime in ("onnxruntime", "deepsparse", "sparse-cpu"):
        if runtime == "sparse-cpu":
            from .sparse_cpu.runtime import resolve_export_dir

            d = resolve_export_dir(p)
        else:
            d = resolve_onnx_dir(p)
        eng = read_export_manifest(d).get("engines", {})  # the export's shapes are the defaults
        pl = pl or eng.get("prefill", {}).get("seq", 128)
        ml = ml or eng.get("max_len", 512)
        tok_dir = d
    else:
        tok_dir = resolve_hf_dir(p)
        check_masks(tok_dir)  # the checkpoint the torch runner loads must agree with its masks
    pl, ml = pl or 128, ml or 512
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"could not load the tokenizer from '{tok_dir}': {first}")
    return make_runner(p, runtime, prefill_len=pl, max_len=ml, threads=threads, device=device), tok


def generate(runner: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 32, *, stop_at_eos: bool = True) -> dict:
    """Greedy decoding through any Runner: returns {"text", "tokens" (new ids), "prompt_tokens"}."""
    ids = tokenizer(prompt, return_tensors="np")["input_ids"].astype(np.int64)
    if ids.shape[1] == 0:
        raise UserError("the prompt is empty after tokenisation; give some text with --prompt")
    if ids.shape[1] + max_new_tokens > runner.max_len:
        raise UserError(f"prompt ({ids.shape[1]} tokens) + {max_new_tokens} new tokens exceed max_len={runner.max_len}")
    logits = runner.prefill(ids)[0, -1]
    eos = tokenizer.eos_token_id
    new: list[int] = []
    for i in range(max_new_tokens):
        tok = int(np.argmax(logits))
        new.append(tok)
        if stop_at_eos and eos is not None and tok == eos:
            break
        if i + 1 < max_new_tokens:
            logits = runner.decode(tok)
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "tokens": new, "prompt_tokens": int(ids.shape[1])}
