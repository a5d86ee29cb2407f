"""Runners: the fixed-shape KV-cache runners (onnxruntime, DeepSparse) must reproduce PyTorch's logits step by
step, including chunked prefill of prompts longer than prefill_len and left padding; and the error cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from losa_deploy.errors import UserError

PL, ML = 8, 48


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory) -> Path:
    """A deepsparse-format directory made directly with the wrapper (no DeepSparse compile: fast)."""
    from sparse_tiny import save_sparse_tiny
    from transformers import AutoModelForCausalLM

    from exporters.common import copy_tokenizer_and_config
    from exporters.wrapper import export_wrapper_onnx
    from tiny import byte_tokenizer

    root = tmp_path_factory.mktemp("runners")
    src = save_sparse_tiny(root / "model", "70")
    model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    out = root / "model" / "deepsparse"
    out.mkdir()
    export_wrapper_onnx(model, str(out / "model.onnx"), seq=PL, past=ML - PL, table_len=512)
    copy_tokenizer_and_config(src, byte_tokenizer(), model.config, out)
    (out / "export_manifest.json").write_text(json.dumps({
        "format": "deepsparse", "source": str(src), "rotary_table_len": 512,
        "engines": {"prefill": {"seq": PL}, "decode": {"seq": 1}, "max_len": ML}}))
    return src


def _torch_steps(model, ids: np.ndarray, steps: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    with torch.no_grad():
        o = model(input_ids=torch.from_numpy(ids), use_cache=True)
        pre, past, dec = o.logits[0].numpy(), o.past_key_values, []
        for t in steps:
            o = model(input_ids=torch.tensor([[t]]), past_key_values=past, use_cache=True)
            past = o.past_key_values
            dec.append(o.logits[0, -1].numpy())
    return pre, dec


def _check_runner(runner, model, prompt_len: int) -> None:
    rng = np.random.default_rng(prompt_len)
    ids = rng.integers(0, 256, size=(1, prompt_len)).astype(np.int64)
    steps = [int(x) for x in rng.integers(0, 256, size=6)]
    ref_pre, ref_dec = _torch_steps(model, ids, steps)
    pre = runner.prefill(ids)
    assert pre.shape == (1, prompt_len, model.config.vocab_size)
    np.testing.assert_allclose(pre[0], ref_pre, atol=1e-4, rtol=0)
    for t, ref in zip(steps, ref_dec):
        got = runner.decode(t)
        assert got.shape == (model.config.vocab_size,)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def torch_model(ds_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ds_dir).eval()


@pytest.mark.parametrize("prompt_len", [1, 5, PL, 2 * PL + 3])  # single token, left-padded, exact, chunked
def test_onnxruntime_runner_matches_torch(ds_dir, torch_model, prompt_len):
    from losa_deploy.runners import make_runner

    r = make_runner(ds_dir, "onnxruntime", prefill_len=PL, max_len=ML, threads=1)
    assert r.name == "onnxruntime" and r.threads == 1
    _check_runner(r, torch_model, prompt_len)
    # prefill starts a new sequence: a second run gives the same numbers
    _check_runner(r, torch_model, prompt_len)


def test_torch_runner_and_generate(ds_dir, torch_model):
    from tiny import byte_tokenizer

    from losa_deploy.runners import generate, make_runner

    tok = byte_tokenizer()
    t = make_runner(ds_dir, "torch", prefill_len=PL, max_len=ML, threads=1)
    o = make_runner(ds_dir / "deepsparse", "onnxruntime", prefill_len=PL, max_len=ML, threads=1)
    _check_runner(t, torch_model, 11)
    a = generate(t, tok, "sparse models are", 12, stop_at_eos=False)
    b = generate(o, tok, "sparse models are", 12, stop_at_eos=False)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 12 and a["prompt_tokens"] == len("sparse models are")


def test_runner_limits_and_errors(ds_dir, tmp_path):
    from losa_deploy.runners import make_runner

    r = make_runner(ds_dir, "onnxruntime", prefill_len=PL, max_len=ML, threads=1)
    with pytest.raises(UserError, match="max_len"):
        r.prefill(np.zeros((1, ML), dtype=np.int64))
    r.prefill(np.zeros((1, ML - 1 - 7), dtype=np.int64))  # 40 tokens: 5 prefill chunks exactly fill 40 slots
    for _ in range(8):  # 40 + 8 = max_len tokens fit exactly
        r.decode(1)
    with pytest.raises(UserError, match="max_len"):
        r.decode(1)
    with pytest.raises(UserError, match="unknown runtime"):
        make_runner(ds_dir, "tensorrt", prefill_len=PL, max_len=ML)
    with pytest.raises(UserError, match="--format deepsparse"):
        make_runner(tmp_path, "onnxruntime", prefill_len=PL, max_len=ML)
    with pytest.raises(UserError, match="prefill_len"):
        make_runner(ds_dir, "onnxruntime", prefill_len=ML, max_len=ML)
    with pytest.raises(UserError, match="position table"):
        make_runner(ds_dir, "onnxruntime", prefill_len=PL, max_len=1024)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_torch_2of4_needs_cuda(ds_dir):
    from losa_deploy.runners import make_runner

    with pytest.raises(UserError, match="CUDA"):
        make_runner(ds_dir, "torch-2of4", prefill_len=PL, max_len=ML, device="cuda")


def test_is_2of4():
    from losa_deploy.runners import is_2of4

    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3]])
    assert is_2of4(w)
    assert not is_2of4(torch.tensor([[1.0, 1, 1, 0]]))
    assert not is_2of4(torch.ones(2, 6))


def test_deepsparse_runner_matches_torch(ds_dir, torch_model):
    pytest.importorskip("deepsparse")
    from losa_deploy.runners import make_runner

    r = make_runner(ds_dir, "deepsparse", prefill_len=PL, max_len=ML, threads=1)
    assert r.name == "deepsparse"
    _check_runner(r, torch_model, 2 * PL + 3)
    _check_runner(r, torch_model, 3)


@pytest.mark.gpu
def test_torch_2of4_matches_dense_fp16(tmp_path):
    """On a CUDA GPU: 2:4 linears swapped to semi-structured sparse tensors match the dense fp16 model."""
    from sparse_tiny import prune_linears_
    from transformers import LlamaConfig, LlamaForCausalLM

    from losa_deploy.runners import make_runner
    from tiny import byte_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=258, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, bos_token_id=256, eos_token_id=257, pad_token_id=257)
    m = LlamaForCausalLM(cfg).eval()
    prune_linears_(m, "2:4")
    m.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    r = make_runner(tmp_path / "m", "torch-2of4", prefill_len=64, max_len=256, device="cuda")
    assert len(r.swapped) == 2 * 7
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float16).cuda().eval()
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        ref = dense(ids.cuda()).logits[0].float().cpu().numpy()
    got = r.prefill(ids.numpy())[0]
    np.testing.assert_allclose(got, ref, atol=5e-2, rtol=0)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.95


def test_missing_deepsparse_says_how_to_get_it(monkeypatch, ds_dir, tmp_path):
    import sys

    from exporters.deepsparse_export import export_deepsparse
    from losa_deploy.runners import require_deepsparse

    monkeypatch.setitem(sys.modules, "deepsparse", None)  # `import deepsparse` now raises ImportError
    with pytest.raises(UserError, match=r"Python 3\.8-3\.11: pip install deepsparse==1\.8\.0"):
        require_deepsparse()
    with pytest.raises(UserError, match="pip install deepsparse"):
        export_deepsparse(ds_dir, tmp_path / "out", prefill_len=PL, max_len=ML)
    assert not (tmp_path / "out").exists()



def test_runners_and_graph_contract_import_no_exporter_code():
    """The layering: graph_contract sits below runners and exporters; neither module imports exporters/, not even
    inside a function."""
    import ast

    import losa_deploy.graph_contract as gc
    import losa_deploy.runners as rn

    for mod in (rn, gc):
        tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
        assert not [m for m in names if m.split(".")[0] == "exporters"], mod.__name__
