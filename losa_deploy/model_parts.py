"""Find the decoder blocks and their prunable linear layers of any HF causal LM, without per-architecture tables.

The pipeline needs two things from a model: the ModuleList of decoder blocks (pruned one at a time) and, inside a
block, the `nn.Linear` layers to prune. Embeddings and `lm_head` live outside the blocks, so they are never pruned.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence

import torch.nn as nn

from .errors import UserError

# Where the common families keep their decoder blocks, tried first (fast, unambiguous).
_KNOWN_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi3, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, Falcon, BLOOM, GPT-J
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.language_model.layers",  # multimodal wrappers (Gemma3, Llava...)
    "transformer.blocks",  # MPT
)


def _get(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the decoder blocks.

    Known paths first; otherwise the largest ModuleList whose length equals `config.num_hidden_layers`
    (or the largest ModuleList of identical modules), so new architectures usually work without code changes.
    """
    for path in _KNOWN_PATHS:
        ml = _get(model, path)
        if isinstance(ml, nn.ModuleList) and len(ml) > 0:
            return path, ml
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1 or not find_linears(mod[0]):
            continue
        if n_layers is not None and len(mod) == n_layers:
            return name, mod
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise UserError(f"{type(model).__name__} is not supported: no ModuleList of decoder blocks with "
                        "torch.nn.Linear layers found (losa-deploy prunes the nn.Linear weights of the decoder blocks)")
    return best


def require_linear_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks, or a one-line UserError naming the architecture and what its blocks lack.

    Every command works on the `nn.Linear` weights of the decoder blocks (pruned, adapted, checked for zeros in
    the exports). GPT-2-style blocks hold `Conv1D` modules (a transposed weight) instead, which nothing here
    handles, so they are refused instead of being reported as "nothing left to prune"."""
    name, blocks = find_blocks(model)
    if not any(find_linears(b) for b in blocks):
        arch = type(model).__name__
        mt = getattr(getattr(model, "config", None), "model_type", None)
        others = sorted({type(m).__name__ for m in blocks[0].modules()
                         if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2})
        held = f" (they hold {', '.join(others)})" if others else ""
        raise UserError(f"{arch} (model_type '{mt}') is not supported: its decoder blocks ({name}) have no "
                        f"torch.nn.Linear layer{held}, and losa-deploy prunes only nn.Linear weights")
    return name, blocks


def require_linear_blocks_config(config: Any) -> None:
    """`require_linear_blocks` from a config alone: the model is built on the meta device (no weights, no memory),
    so a command can refuse an architecture before it loads anything."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # a config transformers cannot build: the loader reports it with its own message
        mt = getattr(config, "model_type", None)
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"cannot build model_type '{mt}' from its config: {why}")
    require_linear_blocks(model)


def find_linears(block: nn.Module, ignore: Sequence[str] = (), prefix: str = "") -> dict[str, nn.Linear]:
    """{name relative to the block: nn.Linear}, in module order, skipping those whose full weight name
    (`prefix + name + ".weight"`) or relative name matches an `ignore` fnmatch pattern."""
    found: dict[str, nn.Linear] = {}
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) and name:
            full = f"{prefix}{name}.weight"
            if is_ignored(full, ignore) or is_ignored(name, ignore):
                continue
            found[name] = mod
    return found


def is_ignored(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def block_prefix(blocks_name: str, index: int) -> str:
    """Parameter-name prefix of block `index`, e.g. `model.layers.3.`."""
    return f"{blocks_name}.{index}."


def prunable_linears(model: nn.Module, ignore: Sequence[str] = ()) -> dict[str, tuple[int, nn.Linear]]:
    """{full weight name: (block index, linear)} for every linear the pipeline would prune."""
    name, blocks = find_blocks(model)
    out: dict[str, tuple[int, nn.Linear]] = {}
    for i, blk in enumerate(blocks):
        pre = block_prefix(name, i)
        for lname, lin in find_linears(blk, ignore, prefix=pre).items():
            out[f"{pre}{lname}.weight"] = (i, lin)
    return out


def block_param_counts(model: nn.Module, ignore: Sequence[str] = ()) -> list[int]:
    """Prunable weight count per block (the weights for a parameter-weighted mean sparsity)."""
    name, blocks = find_blocks(model)
    return [
        sum(lin.weight.numel() for lin in find_linears(blk, ignore, prefix=block_prefix(name, i)).values())
        for i, blk in enumerate(blocks)
    ]
