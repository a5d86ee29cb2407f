"""`export --format compressed-tensors` (alias hf): written through compressed-tensors' ModelCompressor, verified by
the library's decompressor, and read back bit-exactly in a fresh process by code that is not ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from losa_deploy.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exports(s70, s24, tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    from exporters.compressed_tensors_export import export_compressed_tensors

    root = tmp_path_factory.mktemp("ct")
    return {name: (src, root / name, export_compressed_tensors(src, root / name))
            for name, src in (("s70", s70), ("s24", s24))}


def test_is_2of4_and_plan_on_hand_made_weights():
    from exporters.compressed_tensors_export import is_2of4, plan_sparsity

    w = torch.zeros(2, 8)
    w[:, 0], w[:, 3], w[:, 5] = 1.0, -2.0, 3.0
    assert is_2of4(w)
    w[0, 1] = 4.0  # a group of 4 with 3 non-zeros
    assert not is_2of4(w) and not is_2of4(torch.zeros(2, 6))

    lin = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[1, 0, 0, 2, 0, 3, 0, 0]] * 4, dtype=torch.float32))  # 5/8 zeros, 2:4
        lin[1].weight.fill_(1.0)  # dense: stays out of the compressed set
    plan = plan_sparsity(lin)
    assert plan["format"] == "sparse-24-bitmask" and plan["sparsity_structure"] == "2:4"
    assert plan["targets"] == ["0"] and plan["ignore"] == ["1"]
    assert plan["global_sparsity"] == pytest.approx(20 / 64)
    with torch.no_grad():
        lin[0].weight[0, 1] = 5.0
    assert plan_sparsity(lin)["format"] == "sparse-bitmask"


def test_export_writes_library_config_and_verifies(exports):
    src, out, man = exports["s70"]
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["version"] == "0.14.0.1"
    sc = q["sparsity_config"]
    assert sc["format"] == "sparse-bitmask" and sc["sparsity_structure"] == "unstructured"
    assert sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"]
    # 28 linears with 70% of each row zeroed, in a model whose (tied) embedding stays dense
    assert 0.3 < sc["global_sparsity"] < 0.7
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "export_manifest.json"):
        assert (out / f).is_file(), f
    assert not (out / "sparsity_masks.safetensors").exists()
    assert man["format"] == "compressed-tensors" and man["compressed_layers"] == 28 and man["dense_layers"] == 1
    assert man["verification"]["decompressed_exact"] and man["verification"]["tied_not_stored"] == ["lm_head.weight"]
    s = man["sizes"]
    assert s["compressed_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 0.3 < s["ratio"] < 0.6  # linears shrink to ~0.3*4+1/8 bytes per weight; the dense embedding dominates

    src24, out24, man24 = exports["s24"]
    sc24 = json.loads((out24 / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc24["format"] == "sparse-24-bitmask" and sc24["sparsity_structure"] == "2:4"
    assert man24["load"] == "AutoModelForCausalLM.from_pretrained(DIR, dtype='auto')"


def test_fresh_process_restores_bit_exactly(exports):
    """Only transformers + compressed-tensors in a new interpreter: every tensor equal to the source checkpoint."""
    script = textwrap.dedent("""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        src24, out24, src70, out70 = sys.argv[1:5]

        def same(a, b):
            a, b = a.state_dict(), b.state_dict()
            return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

        res = {}
        ref = AutoModelForCausalLM.from_pretrained(src24)
        res["from_pretrained_24"] = same(ref, AutoModelForCausalLM.from_pretrained(out24, dtype="auto"))
        # sparse-bitmask: the library's decompressor on a model built from the config (what load_sparse does)
        from compressed_tensors.compressors import ModelCompressor
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(out70)
        model = AutoModelForCausalLM.from_config(cfg)
        ModelCompressor.from_pretrained(out70).decompress(out70, model)
        model.tie_weights()
        res["decompress_bitmask"] = same(AutoModelForCausalLM.from_pretrained(src70), model)
        try:  # transformers 4.57 sizes compressed tensors on the meta device: only the 2:4 compressor can
            AutoModelForCausalLM.from_pretrained(out70, dtype="auto")
            res["from_pretrained_bitmask"] = "loads"
        except Exception as e:
            res["from_pretrained_bitmask"] = type(e).__name__
        print(json.dumps(res))
    """)
    (s24, o24, _), (s70, o70, _) = exports["s24"], exports["s70"]
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, "-c", script, str(s24), str(o24), str(s70), str(o70)], capture_output=True,
                       text=True, env=env, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["from_pretrained_24"] is True and res["decompress_bitmask"] is True
    # If this starts loading, an upgrade fixed it upstream: make sparse-bitmask's manifest say from_pretrained too.
    assert res["from_pretrained_bitmask"] == "NotImplementedError"


def test_load_sparse_and_logits(exports):
    from transformers import AutoModelForCausalLM

    from exporters.compressed_tensors_export import load_sparse

    src, out, _ = exports["s70"]
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    got = load_sparse(out)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)
    assert got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()  # tied again


def test_failed_verification_writes_nothing(s70, tmp_path, monkeypatch):
    import exporters.compressed_tensors_export as cte

    real = cte.decompressed_tensors

    def corrupt(path):  # one weight of one layer comes back off by one
        for k, v in real(path):
            if k == "model.layers.1.self_attn.q_proj.weight":
                v = v.clone()
                v[0, 0] += 1.0
            yield k, v

    monkeypatch.setattr(cte, "decompressed_tensors", corrupt)
    with pytest.raises(UserError, match="not exact"):
        cte.export_compressed_tensors(s70, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_dense_checkpoint_is_a_one_line_error(tiny_dir, tmp_path):
    from exporters.compressed_tensors_export import export_compressed_tensors

    with pytest.raises(UserError, match="nothing to compress"):
        export_compressed_tensors(tiny_dir, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_cli_hf_alias(s70, tmp_path, capsys, monkeypatch):
    from losa_deploy.cli import main

    out = tmp_path / "o"
    monkeypatch.setattr("sys.argv", ["losa-deploy", "export", str(s70), "--format", "hf", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        main()
    o = capsys.readouterr()
    assert (e.value.code or 0) == 0, o.err
    assert "compressed-tensors sparse-bitmask" in o.out and "decompressed exactly: True" in o.out
    assert json.loads((out / "export_manifest.json").read_text())["format"] == "compressed-tensors"
    # the torch runner on the export directory runs its source checkpoint
    monkeypatch.setattr("sys.argv", ["losa-deploy", "generate", str(out), "--prompt", "ab", "--max-new-tokens", "2"])
    with pytest.raises(SystemExit) as e:
        main()
    o = capsys.readouterr()
    assert (e.value.code or 0) == 0 and o.out.startswith("ab"), o.err
