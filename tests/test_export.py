"""Export formats on tiny sparse Llamas: parity with PyTorch, zero patterns kept, 2:4 checker, and the one-line
errors (compressed-tensors: tests/test_compressed_tensors.py). One integration test exports the real model to
DeepSparse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from losa_deploy.errors import UserError

PL, ML = 16, 64


# ------------------------------------------------------------------------------------------- 2:4 checker (pure)
def test_check_2of4_hand_made_weights():
    from exporters.tensorrt_export import check_2of4, two_four_report

    ok = np.zeros((16, 16), np.float32)
    ok[:, 0::4] = 1.0
    ok[:, 3::4] = -2.0  # 2 of every 4 inputs kept
    assert check_2of4(ok) == ("eligible", "")
    sparser = np.zeros((16, 16), np.float32)
    sparser[:, 1::4] = 1.0  # 1 of 4 is still 2:4-compatible
    assert check_2of4(sparser)[0] == "eligible"
    bad = ok.copy()
    bad[5, 1] = 3.0  # one group with 3 non-zeros
    status, why = check_2of4(bad)
    assert status == "ineligible" and "wrong pattern" in why and "1 of 64 groups" in why
    dense = np.ones((16, 16), np.float32)
    status, why = check_2of4(dense)
    assert status == "ineligible" and why.startswith("dense")
    status, why = check_2of4(np.zeros((16, 6), np.float32))
    assert status == "ineligible" and "K=6 is not a multiple of 4" in why
    status, why = check_2of4(np.zeros((16, 20), np.float32))
    assert status == "ineligible" and "multiple of 16" in why
    # 2:4 along K (dim 1), not along N: a pattern that is 2:4 only along dim 0 must fail
    col = np.zeros((16, 16), np.float32)
    col[0::4, :] = 1.0
    col[1::4, :] = 1.0
    assert check_2of4(col)[0] == "ineligible"
    rep = two_four_report({"a": ok, "b": bad}, {"lm_head": "not pruned"})
    assert rep["summary"] == {"eligible": 1, "ineligible": 1, "skipped": 1}
    assert rep["first_ineligible"] == "b"


def test_magnitude_2of4_hand_computed():
    from exporters.tensorrt_export import magnitude_2of4_

    w = torch.tensor([[0.1, -0.5, 0.3, 0.2, 4.0, 3.0, -2.0, 1.0]])
    keep = magnitude_2of4_(w)
    assert torch.equal(w, torch.tensor([[0.0, -0.5, 0.3, 0.0, 4.0, 3.0, 0.0, 0.0]]))
    assert keep.tolist() == [[False, True, True, False, True, True, False, False]]


# --------------------------------------------------------------------------------------------------- onnx
def test_onnx_export_parity_and_zero_patterns(s70, tmp_path):
    import onnx

    from exporters.common import map_initializers
    from exporters.onnx_export import export_onnx

    out = tmp_path / "onnx"
    man = export_onnx(s70, out)
    v = man["verification"]["onnxruntime_vs_torch"]
    assert v["max_abs_logit_diff"] <= 1e-3 and v["logit_tolerance"] == 1e-3 and v["tokens_match"]
    assert man["verification"]["zero_pattern"] == {"ok": True, "checked": 28, "missing": [], "violations": []}
    assert man["masks_from"] == "sparsity_masks.safetensors"
    assert json.loads((out / "export_manifest.json").read_text())["format"] == "onnx"
    # independent check: the q_proj weight of block 0 sits in an initializer with its exact zeros (maybe transposed)
    from safetensors.torch import load_file

    w = load_file(str(s70 / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].numpy()
    found = map_initializers(onnx.load(str(out / "model.onnx")), {"q": w}, out)
    assert "q" in found
    assert np.array_equal(found["q"]["array"] == 0, w == 0) and (w == 0).mean() >= 0.68


# ---------------------------------------------------------------------------------------------- deepsparse
def test_deepsparse_export_compiles_and_matches(s70, tmp_path):
    pytest.importorskip("deepsparse")
    import onnx

    from exporters.deepsparse_export import export_deepsparse

    out = tmp_path / "ds"
    man = export_deepsparse(s70, out, prefill_len=PL, max_len=ML, threads=1)
    assert (out / "model.onnx").is_file() and (out / "model.data").is_file()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    g = onnx.load(str(out / "model.onnx"), load_external_data=False)
    names = [i.name for i in g.graph.input]
    assert names[:4] == ["input_ids", "attention_mask", "positions", "causal_mask"]
    assert names[4:6] == ["past_key_values.0.key", "past_key_values.0.value"] and len(names) == 4 + 2 * 4
    assert [o.name for o in g.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    past = [d.dim_value or d.dim_param for d in g.graph.input[4].type.tensor_type.shape.dim]
    assert past == [1, 2, "past", 16]  # batch, kv_heads, length, head_dim
    assert 14 <= man["opset"] <= 17
    ops = {n.op_type for n in g.graph.node}
    assert "IsNaN" not in ops and "MatMul" in ops
    v = man["verification"]
    assert v["onnxruntime_vs_torch"]["max_abs_logit_diff"] <= 1e-3 and v["onnxruntime_vs_torch"]["tokens_match"]
    assert v["deepsparse_vs_torch"]["tokens_match"] and v["deepsparse_vs_torch"]["new_tokens"] == 16
    assert v["deepsparse_vs_torch"]["max_abs_logit_diff"] <= 1e-3
    assert v["zero_pattern"]["ok"] and v["zero_pattern"]["checked"] == 28
    frac = man["deepsparse"]["fraction_of_supported_ops"]
    assert frac["prefill"] > 0.9 and frac["decode"] > 0.9
    assert len(man["deepsparse"]["sparse_layers"]) == 28 and man["deepsparse"]["dense_layers"] == []
    assert all(0.68 <= s <= 0.71 for s in man["layer_sparsity"].values())


def test_deepsparse_refuses_unsupported_arch(tmp_path):
    pytest.importorskip("deepsparse")
    from tiny import save_tiny

    from exporters.deepsparse_export import export_deepsparse

    src = save_tiny(tmp_path / "opt", arch="opt")
    with pytest.raises(UserError, match=r"cannot export this model: OPTForCausalLM \(model_type 'opt'\)"):
        export_deepsparse(src, tmp_path / "out", prefill_len=PL, max_len=ML)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ tensorrt
def test_tensorrt_refuses_non_2of4_then_forces(s70, tmp_path):
    from exporters.tensorrt_export import export_tensorrt

    with pytest.raises(UserError, match=r"first offending layer model\.layers\.0\.self_attn\.q_proj\.weight.*--force-2of4"):
        export_tensorrt(s70, tmp_path / "trt", prefill_len=PL, max_len=ML)
    assert not (tmp_path / "trt").exists()
    man = export_tensorrt(s70, tmp_path / "trt", force_2of4=True, prefill_len=PL, max_len=ML)
    assert man["forced_2of4"]["layers"] == 28
    assert man["two_four"]["summary"]["eligible"] == 28 and man["two_four"]["summary"]["ineligible"] == 0


def test_tensorrt_export_2of4(s24, tmp_path):
    import onnx

    from exporters.tensorrt_export import export_tensorrt

    out = tmp_path / "trt"
    man = export_tensorrt(s24, out, prefill_len=PL, max_len=ML)
    assert man["forced_2of4"] is None
    assert man["two_four"]["summary"] == {"eligible": 28, "ineligible": 0, "skipped": 1}  # lm_head copy skipped
    cmd = man["trtexec"]
    assert cmd.startswith(f"trtexec --onnx={out / 'model.onnx'} --fp16 --sparsity=enable --saveEngine=")
    assert (out / "build_engine.sh").read_text().strip().endswith(cmd)
    assert "sparsity_config" not in json.loads((out / "config.json").read_text())
    g = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in g.graph.initializer)
    assert man["verification"]["zero_pattern"]["ok"]
    ort = man["verification"]["onnxruntime_fp16_vs_torch_fp32"]
    if "skipped" not in ort:
        assert ort["max_abs_logit_diff"] <= ort["logit_tolerance"]


# -------------------------------------------------------------------------------------------------- errors
class _Result:
    def __init__(self, code: int, output: str) -> None:
        self.exit_code, self.output = code, output


def _cli(args, capsys, monkeypatch) -> _Result:
    """Run the real entry point (losa_deploy.cli.main, which turns UserError into `error: ...`)."""
    from tiny import run_cli

    return _Result(*run_cli(monkeypatch, capsys, *args))


def test_cli_errors_are_one_line(s70, tmp_path, capsys, monkeypatch):
    def _run(args):
        return _cli(args, capsys, monkeypatch)

    r = _run(["export", str(tmp_path / "nope"), "--format", "onnx"])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output
    (tmp_path / "empty").mkdir()
    r = _run(["export", str(tmp_path / "empty"), "--format", "hf"])
    assert r.exit_code == 2 and "no config.json" in r.output
    (tmp_path / "exists").mkdir()
    r = _run(["export", str(s70), "--format", "hf", "--out", str(tmp_path / "exists")])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = _run(["export", str(s70), "--format", "gguf"])
    assert r.exit_code == 2 and "unknown --format" in r.output
    r = _run(["generate", str(s70), "--runtime", "deepsparse", "--prompt", "hi"])
    assert r.exit_code == 2 and "--format deepsparse" in r.output


def test_cli_export_hf_and_generate_torch(s70, tmp_path, capsys, monkeypatch):
    def _run(args):
        return _cli(args, capsys, monkeypatch)

    out = tmp_path / "hf"
    r = _run(["export", str(s70), "--format", "hf", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "compressed-tensors sparse-bitmask" in r.output and (out / "export_manifest.json").is_file()
    r = _run(["generate", str(s70), "--runtime", "torch", "--prompt", "abc", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("abc") and "torch: 4 new tokens" in r.output


def test_failed_export_leaves_nothing(s70, tmp_path, monkeypatch):
    import exporters.onnx_export as oe

    def bad_compare(*a, **k):
        return {"max_abs_logit_diff": 1.0, "logits_ok": False, "tokens_match": False}

    monkeypatch.setattr(oe, "compare", bad_compare)
    with pytest.raises(UserError, match="failed verification"):
        oe.export_onnx(s70, tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a .partial directory


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.integration
def test_real_model_deepsparse_16_tokens(tmp_path):
    pytest.importorskip("deepsparse")
    from losa_deploy.models import resolve_model

    from exporters.deepsparse_export import export_deepsparse

    src = Path(resolve_model("smollm2-135m").path)
    man = export_deepsparse(src, tmp_path / "ds", prefill_len=32, max_len=96, threads=2, verify_tokens=16)
    v = man["verification"]
    assert v["deepsparse_vs_torch"]["tokens_match"] and v["deepsparse_vs_torch"]["new_tokens"] == 16
    assert v["onnxruntime_vs_torch"]["max_abs_logit_diff"] <= 1e-3
    assert man["deepsparse"]["fraction_of_supported_ops"]["decode"] > 0.9
