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


# Architectures with a tiny config below; the "features" each one exercises are in ARCH_FEATURES.
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3")
ARCH_FEATURES = {
    "llama": "baseline: RMSNorm, rotary, GQA, tied embeddings",
    "qwen2": "q/k/v biases; sliding window (8 tokens) on blocks 2-3 only",
    "qwen3": "q/k RMSNorm inside attention",
    "mistral": "sliding window (8 tokens) on every block",
    "gemma": "(1 + w) RMSNorm, embeddings scaled by sqrt(hidden), GeGLU",
    "gemma2": "(1 + w) RMSNorm, pre/post feed-forward norms, attention and final logit soft-capping, "
              "alternating sliding (8 tokens) / global blocks, sqrt(hidden) embedding scale",
    "gemma3": "gemma2's norms plus q/k norm, local and global rotary tables, sliding (8) / global blocks",
    "phi3": "fused qkv_proj and gate_up_proj, partial rotary, sliding window (8 tokens), untied head",
}
SLIDING_WINDOW = 8  # tiny: shorter than the export tests' prompts, so the window really masks something


def tiny_config(arch: str = "llama", layers: int = 4, hidden: int = 64, inter: int = 128, heads: int = 4, kv_heads: int = 2) -> Any:
    """A transformers config of `arch` with tiny sizes (vocab 258 = the byte tokenizer's), same model class."""
    import transformers as tf

    vocab = 258
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  bos_token_id=256, eos_token_id=257, pad_token_id=257, tie_word_embeddings=True)
    hd = hidden // heads
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=SLIDING_WINDOW, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=layers // 2,
                              **common)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=hd, **common)
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=hd, **common)
    if arch == "gemma2":
        # larger weights and small caps, so that both soft-cappings change the logits (by ~1, not ~1e-7)
        return tf.Gemma2Config(head_dim=hd, query_pre_attn_scalar=hd, sliding_window=SLIDING_WINDOW,
                               layer_types=alternating, initializer_range=0.1, attn_logit_softcapping=1.0,
                               final_logit_softcapping=2.0, **common)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(head_dim=hd, query_pre_attn_scalar=hd, sliding_window=SLIDING_WINDOW,
                                   layer_types=alternating, rope_local_base_freq=100.0, **common)
    if arch == "phi3":
        return tf.Phi3Config(sliding_window=SLIDING_WINDOW, partial_rotary_factor=0.5,
                             **(common | {"tie_word_embeddings": False}))
    if arch == "gpt2":  # Conv1D blocks: what losa-deploy refuses
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                             n_inner=inter, bos_token_id=256, eos_token_id=257)
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


def run_cli(monkeypatch: Any, capsys: Any, *args: str) -> tuple[int, str]:
    """The real entry point in-process (losa_deploy.cli.main turns a UserError into `error: ...` and an exit code):
    the exit code and everything printed to stdout and stderr."""
    from losa_deploy.cli import main

    monkeypatch.setattr("sys.argv", ["losa-deploy", *args])
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    o = capsys.readouterr()
    return code, o.out + o.err
