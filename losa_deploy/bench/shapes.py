"""Synthetic models with the papers' matrix shapes, so their speed-ups can be measured on a small machine.

Sparse speed-ups depend on matrix shapes (small matrices leave kernels overhead-bound), so the embedded 135M model
cannot show what LLaMA-2-7B would. `build_shape_pair` writes two Hugging Face checkpoints with K decoder blocks of
LLaMA-2-7B's shapes (hidden 4096, intermediate 11008, 32 heads, no GQA), random weights (seeded), one dense and one
magnitude-pruned per row at the sparse model's rates. Timing both through the same runtimes gives the speed-up at
the papers' shapes.

lm_head: kept dense (as LLaMA sparsity recipes do) and its vocabulary scaled to K/32 of LLaMA's 32000, so that it is
the same share of the weights as in the 32-block 7B model (2% of the parameters); a full 32000 x 4096 head next to
only K blocks would dominate decode and hide the blocks' speed-up. The embedding is not pruned (a gather).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError

SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       full_layers=32, full_vocab=32000, rms_norm_eps=1e-5, rope_theta=10000.0),
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MAX_BLOCKS_HINT = 6  # ~0.8 GB fp32 per 7B-shaped block; the bench keeps one fp32 copy in memory at a time


def scaled_vocab(shape: str, blocks: int) -> int:
    s = SHAPES[shape]
    return max(256, round(s["full_vocab"] * blocks / s["full_layers"]))


def shape_config(shape: str, blocks: int, max_positions: int = 4096) -> Any:
    import transformers as tf

    if shape not in SHAPES:
        raise UserError(f"unknown --shapes '{shape}': choose one of {', '.join(SHAPES)}")
    if blocks < 1:
        raise UserError(f"--blocks must be >= 1 (got {blocks})")
    s = SHAPES[shape]
    v = scaled_vocab(shape, blocks)
    return tf.LlamaConfig(
        vocab_size=v, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=blocks, num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=max_positions,
        rms_norm_eps=s["rms_norm_eps"], rope_theta=s["rope_theta"], tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def linear_rates_from_model(sparse_dir: str | Path) -> dict[str, float]:
    """Mean sparsity per linear type (q/k/v/o/gate/up/down) of a sparse checkpoint, averaged over its blocks.

    From the compress manifest's realised sparsity when there is one, else counted from the weights (W == 0).
    """
    from ..artifact import prunable_weights

    d = Path(sparse_dir)
    per: dict[str, list[float]] = defaultdict(list)
    for name, info in prunable_weights(d).items():
        kind = _kind(name)
        if kind and info.get("realised") is not None:
            per[kind].append(float(info["realised"]))
    if not per:
        from .bounds import inventory_from_dir

        for t in inventory_from_dir(d).tensors:
            kind = _kind(t.name)
            if kind and t.role == "block_linear":
                per[kind].append(1.0 - t.nnz / t.numel)
    if not per:
        raise UserError(f"no prunable linear layers found in '{d}' to take sparsity rates from; pass --sparsity")
    return {k: sum(v) / len(v) for k, v in per.items()}


def _kind(name: str) -> str | None:
    for k in LINEARS:
        if k in name:
            return k
    return None


def _tokenizer(vocab: int) -> Any:
    """A byte-level tokenizer (258 ids) so the checkpoint is complete; timing feeds ids directly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    ids = {ch: i + 3 for i, ch in enumerate(alphabet)}
    ids.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tk = Tokenizer(models.BPE(vocab=ids, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<unk>", unk_token="<unk>"
    )


def build_shape_pair(
    out_dir: str | Path,
    *,
    shape: str = "llama-2-7b",
    blocks: int = 2,
    rates: dict[str, float] | float,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `<out>/dense` and `<out>/sparse` (HF checkpoints; sparse with `sparsity_masks.safetensors`).

    `rates`: one sparsity for every linear, or {linear kind: sparsity} (see `linear_rates_from_model`).
    Reuses an existing pair built with the same settings. Returns a description for the report.
    """
    import torch

    from ..artifact import save_masks
    from ..atomic import atomic_dir, write_json
    from ..pruning.masks import unstructured_row_mask

    out = Path(out_dir)
    cfg = shape_config(shape, blocks)
    if isinstance(rates, (int, float)):
        if not 0.0 <= float(rates) < 1.0:
            raise UserError(f"--sparsity must be in [0, 1) (got {rates})")
        rates = {k: float(rates) for k in LINEARS}
    desc = {
        "shape": shape, "blocks": blocks, "seed": seed,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads, "vocab_size": cfg.vocab_size,
        "rates": {k: round(float(v), 6) for k, v in sorted(rates.items())},
        "lm_head": f"dense, untied, vocab scaled to {blocks}/{SHAPES[shape]['full_layers']} of "
                   f"{SHAPES[shape]['full_vocab']} = {cfg.vocab_size} (same share of weights as in the full model)",
        "init": "normal(0, 0.02), seeded; pruning: magnitude, per output row",
    }
    marker = out / "shapes.json"
    if (
        marker.is_file()
        and json.loads(marker.read_text()).get("settings") == desc
        and (out / "dense").is_dir()
        and (out / "sparse").is_dir()
    ):
        return json.loads(marker.read_text())

    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    # Skip HF's own init (slow for 0.4B params); fill with a seeded normal ourselves.
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)  # its inv_freq buffer was on meta
    model.eval()
    tok = _tokenizer(cfg.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out / "dense", overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    masks: dict[str, torch.Tensor] = {}
    realised: dict[str, float] = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for kind in LINEARS:
                mod = layer.get_submodule(kind)
                m = unstructured_row_mask(mod.weight.abs(), float(rates.get(kind, 0.0)))
                mod.weight.mul_(m)
                pname = f"model.layers.{i}.{kind}.weight"
                masks[pname] = m.to(torch.uint8)
                realised[pname] = 1.0 - float(m.float().mean())
    with atomic_dir(out / "sparse", overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        save_masks(tmp, masks)
    del model
    info = {"settings": desc, "realised": realised, "dense_dir": str(out / "dense"), "sparse_dir": str(out / "sparse")}
    write_json(marker, info)
    return info


def validate_blocks(blocks: int) -> None:
    if blocks < 1:
        raise UserError(f"--blocks must be >= 1 (got {blocks})")
    if blocks > 16:
        raise UserError(
            f"--blocks {blocks} needs ~{blocks * 0.8:.0f} GB per fp32 copy; use at most 16 (2-4 fits a laptop)"
        )


def mean_rate(rates: dict[str, float], shape: str = "llama-2-7b") -> float:
    """Parameter-weighted mean sparsity of one block with these per-linear rates."""
    s = SHAPES[shape]
    h, i = s["hidden_size"], s["intermediate_size"]
    sizes = {k: h * h for k in LINEARS[:4]} | {k: h * i for k in LINEARS[4:]}
    tot = sum(sizes.values())
    return sum(sizes[k] * rates.get(k, 0.0) for k in LINEARS) / tot


def parse_rates_text(items: Sequence[str]) -> dict[str, float]:  # pragma: no cover - convenience for scripts
    return {k: float(v) for k, v in (x.split("=", 1) for x in items)}
