"""Tiny random models and a byte-level tokenizer, built in-process (no downloads), for fast tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <s>, </s>. Any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"] = len(vocab)
    vocab["</s>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    return tok


def tiny_config(arch: str = "llama", layers: int = 4, hidden: int = 64, inter: int = 128, heads: int = 4, kv_heads: int = 2) -> Any:
    import transformers as tf

    vocab = 258
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  bos_token_id=256, eos_token_id=257, pad_token_id=257, tie_word_embeddings=True)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=hidden // heads, **common)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=512, word_embed_proj_dim=hidden,
                            bos_token_id=256, eos_token_id=257, pad_token_id=257)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, **kw: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch, **kw))
    return m.eval()


def save_tiny(path: Path, arch: str = "llama", seed: int = 0, **kw: Any) -> Path:
    m = tiny_model(arch, seed, **kw)
    m.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
