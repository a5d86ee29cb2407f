"""Sparse tiny checkpoints for export/runner tests: a tiny random Llama with its block linears magnitude-pruned."""

from __future__ import annotations

from pathlib import Path

import torch


def prune_linears_(model, pattern: str) -> dict[str, torch.Tensor]:
    """In place: "70" = 70% unstructured per row, "2:4" = 2 kept of every 4 inputs. Returns keep masks."""
    masks = {}
    for n, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in n:
            w = mod.weight.data
            if pattern == "70":
                k = int(0.7 * w.shape[1])
                w.scatter_(1, w.abs().argsort(dim=1)[:, :k], 0.0)
            elif pattern == "2:4":
                g = w.view(w.shape[0], -1, 4)
                g.scatter_(-1, g.abs().argsort(dim=-1)[..., :2], 0.0)
            else:
                raise ValueError(pattern)
            masks[f"{n}.weight"] = w != 0
    return masks


def save_sparse_tiny(path: Path, pattern: str, with_masks: bool = True, seed: int = 0) -> Path:
    from safetensors.torch import save_file
    from tiny import byte_tokenizer, tiny_model

    m = tiny_model("llama", seed=seed)
    masks = prune_linears_(m, pattern)
    m.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    if with_masks:
        save_file({k: v.to(torch.uint8) for k, v in masks.items()}, str(Path(path) / "sparsity_masks.safetensors"))
    return Path(path)
