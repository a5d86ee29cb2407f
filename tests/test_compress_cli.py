"""`losa-deploy compress` end to end on a tiny model directory: artefacts, vanilla reload, profiles, every user
error (one line, non-zero exit, nothing written), interrupted runs, and one integration run on the real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "losa_deploy.cli", "compress", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process through `main()` (the same error handling as the console script)."""
    from losa_deploy import cli

    monkeypatch.setattr(sys, "argv", ["losa-deploy", "compress", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = int(e.code or 0)
    o, e = capsys.readouterr()
    return code, o, e


def test_compress_end_to_end_subprocess_and_vanilla_reload(tiny_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from losa_deploy.checkpoint import load_masks
    from losa_deploy.artifact import read_manifest

    out = tmp_path / "sparse"
    r = _cli("--model", str(tiny_dir), "--out", str(out), "--method", "sparsegpt", "--sparsity", "0.6",
             "--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "64", "--eval-data", str(text_file),
             "--eval-seqlen", "128", "--eval-max-tokens", "512", "--ignore", "*.layers.3.mlp.down_proj.weight")
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "realised" in r.stdout
    man = read_manifest(out)
    assert man["recipe"]["method"] == "sparsegpt" and man["calibration"]["nsamples"] == 4
    assert man["calibration"]["seqlen"] == 64 and man["calibration"]["source"] == str(text_file)
    assert len(man["blocks"]) == 4 and all(b["rate"] == pytest.approx(0.6) for b in man["blocks"])
    assert len(man["linears"]) == 27 and "model.layers.3.mlp.down_proj.weight" not in man["linears"]
    assert man["eval"]["before"]["perplexity"] > 1 and man["eval"]["after"]["perplexity"] > 1
    assert man["memory"]["peak_rss_mb"] > 0 and man["timings"]["prune_s"] > 0
    for v in man["linears"].values():
        assert abs(v["realised"] - v["target"]) < 1 / 64 + 1e-9
    model = AutoModelForCausalLM.from_pretrained(out)
    masks = load_masks(out)
    assert set(masks) == set(man["linears"])
    for k, m in masks.items():
        assert torch.equal(model.get_parameter(k) != 0, m), k
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, dense.model.layers[3].mlp.down_proj.weight)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial dirs left


def test_profile_mixed_with_owl_and_flag_override(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    prof = tmp_path / "p.toml"
    prof.write_text(f'description = "t"\n[compress]\nmethod = "wanda"\npattern = "mixed:8"\nsparsity = 0.75\n'
                    f'allocation = "owl"\ncalib_data = "{text_file}"\nnsamples = 3\nseqlen = 32\nseed = 5\n')
    out = tmp_path / "mixed"
    code, o, e = _main(monkeypatch, capsys, "--profile", str(prof), "--model", str(tiny_dir), "--out", str(out),
                       "--seed", "7", "--json")
    assert code == 0, e
    from losa_deploy.artifact import read_manifest

    man = read_manifest(out)
    assert json.loads(o)["schema"] == "losa-deploy/compress"
    assert man["calibration"]["seed"] == 7  # flag beats profile
    assert man["recipe"]["pattern"] == "mixed:8" and man["profile"] == "p"
    ns = [int(b["n_m"].split(":")[0]) for b in man["blocks"]]
    assert sum(ns) == 4 * 2  # mean 2 kept of 8 = 75% exactly
    assert len(man["allocation"]["outlier_ratios"]) == 4
    for name, v in man["linears"].items():
        assert v["pattern"] == man["blocks"][v["block"]]["n_m"]


def test_atp_auto_records_grid_and_tunes_on_heldout_windows(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "atp"
    code, o, e = _main(monkeypatch, capsys, "--model", str(tiny_dir), "--out", str(out),
                       "--calib-data", str(text_file),
                       "--nsamples", "3", "--seqlen", "32", "--sparsity", "0.6", "--allocation", "atp",
                       "--atp-beta", "auto")
    assert code == 0, e
    man = json.loads((out / "losa_manifest.json").read_text())
    tune = man["allocation"]["tuning"]
    assert len(tune["grid"]) == 7 and tune["grid"][0]["beta"] == 0.0
    lo, hi = tune["range"]
    assert 0 < man["allocation"]["beta"] < hi
    tuning = man["calibration"]["tuning"]
    assert tuning["windows"] == 8 and tuning["identical_to_calibration"] == 0
    rates = [b["rate"] for b in man["blocks"]]
    assert rates == sorted(rates) and sum(rates) / 4 == pytest.approx(0.6)


def test_atp_tuning_restores_the_dense_weights_exactly(text_file):
    from losa_deploy.compress.atp_tuning import one_buffer_copy, tune_atp_beta
    from losa_deploy.compress import Recipe
    from tiny import tiny_model

    model = tiny_model("llama", layers=4, hidden=32, inter=64, heads=4, kv_heads=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 200, (3, 32), generator=torch.Generator().manual_seed(0))
    rec = Recipe.of(out="unused", method="wanda", sparsity=0.6, allocation="atp", atp_beta="auto",
                         calib_data=str(text_file), nsamples=3, seqlen=32)
    beta, info = tune_atp_beta(model, ids, ids[:2], rec, None, "cpu", progress=False)
    assert 0 < beta < info["range"][1] and len(info["grid"]) == rec.rates.atp_grid + 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    copies = one_buffer_copy({"a": torch.ones(2, 3), "b": torch.zeros(4), "c": torch.ones(2, dtype=torch.float64)})
    assert copies["a"].untyped_storage().data_ptr() == copies["b"].untyped_storage().data_ptr()
    assert copies["c"].dtype == torch.float64 and copies["a"].shape == (2, 3) and float(copies["a"].sum()) == 6


def test_rmi_allocation(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rmi"
    code, o, e = _main(monkeypatch, capsys, "--model", str(tiny_dir), "--out", str(out),
                       "--calib-data", str(text_file),
                       "--nsamples", "4", "--seqlen", "32", "--sparsity", "0.7", "--allocation", "rmi")
    assert code == 0, e
    man = json.loads((out / "losa_manifest.json").read_text())
    rates = [b["rate"] for b in man["blocks"]]
    assert sum(rates) / 4 == pytest.approx(0.7) and all(abs(r - 0.7) <= 0.03 + 1e-9 for r in rates)


def test_type_offsets_spare_a_kind_and_keep_every_block_at_its_rate(tiny_dir, text_file, tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "kv"
    code, o, e = _main(monkeypatch, capsys, "--model", str(tiny_dir), "--out", str(out),
                       "--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32", "--sparsity", "0.7",
                       "--type-offset", "k_proj=-0.2", "--type-offset", "v_proj=-0.2")
    assert code == 0, e
    man = json.loads((out / "losa_manifest.json").read_text())
    assert man["recipe"]["type_offsets"] == {"k_proj": -0.2, "v_proj": -0.2}
    lin = man["linears"]
    kv = [v for n, v in lin.items() if n.endswith(("k_proj.weight", "v_proj.weight"))]
    rest = [v for n, v in lin.items() if not n.endswith(("k_proj.weight", "v_proj.weight"))]
    assert kv and all(v["target"] == pytest.approx(0.5) and abs(v["realised"] - 0.5) < 0.01 for v in kv)
    # tiny llama block: q, o 64x64; k, v 32x64; gate, up, down 128x64 -> the rest at (0.7*36864 - 0.5*4096)/32768
    assert all(v["target"] == pytest.approx(0.725, abs=1e-3) for v in rest)
    # whole weights: each block prunes exactly what uniform rates prune, round(0.7 * size) per linear
    size = {"q_proj": 4096, "o_proj": 4096, "k_proj": 2048, "v_proj": 2048, "gate_proj": 8192, "up_proj": 8192,
            "down_proj": 8192}
    for b in man["blocks"]:
        names = [n for n in lin if lin[n]["block"] == b["index"]]
        kinds = [n.split(".")[-2] for n in names]
        assert sorted(kinds) == sorted(size)
        pruned = sum(lin[n]["realised"] * size[k] for n, k in zip(names, kinds))
        assert round(pruned) == sum(round(0.7 * size[k]) for k in kinds) and abs(pruned - round(pruned)) < 1e-6


def test_calib_dtype_bfloat16_is_recorded_and_prunes_exactly(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bf16"
    code, o, e = _main(monkeypatch, capsys, "--model", str(tiny_dir), "--out", str(out),
                       "--calib-data", str(text_file),
                       "--nsamples", "4", "--seqlen", "32", "--method", "sparsegpt", "--sparsity", "0.5",
                       "--calib-dtype", "bfloat16")
    assert code == 0, e
    man = json.loads((out / "losa_manifest.json").read_text())
    assert man["recipe"]["calib_dtype"] == "bfloat16" and man["calibration"]["forward_dtype"] == "bfloat16"
    assert all(abs(v["realised"] - 0.5) < 0.02 for v in man["linears"].values())


def test_cpu_gemm_is_recorded_and_a_bad_setting_refused(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    from losa_deploy.cpu_gemm import onednn_usable

    common = ("--model", str(tiny_dir), "--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32",
              "--method", "sparsegpt", "--sparsity", "0.5")
    masks = {}
    for kind in ("default", "auto"):
        monkeypatch.setenv("LOSA_DEPLOY_CPU_GEMM", kind)
        out = tmp_path / kind
        code, o, e = _main(monkeypatch, capsys, *common, "--out", str(out))
        assert code == 0, e
        man = json.loads((out / "losa_manifest.json").read_text())
        want = "default" if kind == "default" or not onednn_usable() else "onednn"
        assert man["calibration"]["cpu_gemm"] == want
        assert all(abs(v["realised"] - 0.5) < 0.02 for v in man["linears"].values())
        masks[kind] = load_file(str(out / "sparsity_masks.safetensors"))
    # Same kernel family, float32 rounding apart: the masks of a tiny model agree almost everywhere.
    agree = sum(int((masks["default"][k] == masks["auto"][k]).sum()) for k in masks["default"])
    total = sum(m.numel() for m in masks["default"].values())
    assert agree / total > 0.99
    monkeypatch.setenv("LOSA_DEPLOY_CPU_GEMM", "turbo")
    code, o, e = _main(monkeypatch, capsys, *common, "--out", str(tmp_path / "bad"))
    assert code != 0 and "LOSA_DEPLOY_CPU_GEMM" in e and "Traceback" not in e and not (tmp_path / "bad").exists()


def test_magnitude_reads_no_calibration_data(tiny_dir, tmp_path, monkeypatch, capsys):
    """Magnitude with uniform rates never touches data: the default 'self' calibration is not generated."""
    import losa_deploy.data as data

    def boom(*a, **k):
        raise AssertionError("calibration data was built for a data-free prune")

    monkeypatch.setattr(data, "calibration_ids", boom)
    out = tmp_path / "mag"
    code, o, e = _main(monkeypatch, capsys, "--model", str(tiny_dir), "--out", str(out), "--method", "magnitude",
                       "--sparsity", "0.6")
    assert code == 0, e
    man = json.loads((out / "losa_manifest.json").read_text())
    assert man["calibration"]["source"] is None
    assert all(abs(d["realised"] - 0.6) < 0.02 for d in man["linears"].values())


def test_prompted_self_text_is_recorded(tiny_dir, tmp_path, monkeypatch, capsys):
    """`--self-prompted` reaches the self-text sampler, and the manifest says how the text was drawn."""
    monkeypatch.setenv("LOSA_DEPLOY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "w"
    code, o, e = _main(monkeypatch, capsys, "--model", str(tiny_dir), "--out", str(out), "--calib-data", "self",
                       "--nsamples", "4", "--seqlen", "16", "--self-prompted", "0.5")
    assert code == 0, e
    man = json.loads((out / "losa_manifest.json").read_text())
    rec = man["calibration"]["self_text"]
    assert rec["self_prompted"] == 0.5 and rec["prompt_version"] >= 1 and "news article" in rec["genres"]
    assert "{topic}" in rec["prompt"] and "physics" in rec["topics"]
    assert man["recipe"]["self_prompted"] == 0.5


def _error_cases(tiny_dir: Path, text_file: Path, short: Path) -> list[tuple[list[str], str]]:
    base = ["--model", str(tiny_dir), "--calib-data", str(text_file), "--nsamples", "2", "--seqlen", "32"]
    return [
        (base + ["--sparsity", "1.0"], r"\[0, 1\)"),
        (base + ["--sparsity", "-0.2"], r"\[0, 1\)"),
        (base + ["--method", "obs"], "unknown method"),
        (base + ["--pattern", "two:four"], "pattern"),
        (base + ["--allocation", "magic"], "unknown allocation"),
        (base + ["--allocation", "atp", "--atp-beta", "0.9", "--sparsity", "0.5"], r"0 < beta <= 0.333333"),
        (base + ["--pattern", "3:7"], "model.layers.0.self_attn.q_proj.weight"),
        (["--model", str(tiny_dir), "--calib-data", str(short), "--nsamples", "2", "--seqlen", "64"],
         "fewer than one window"),
        (base + ["--eval-data", str(short), "--eval-seqlen", "64"], "fewer than one window"),
        (base + ["--profile", "no-such-profile"], "known profiles"),
        (base + ["--method", "losa", "--steps", "0"], "steps"),
        (base + ["--self-prompted", "1.5"], r"--self-prompted must be in \[0, 1\]"),
        (base + ["--type-offset", "k_proj"], "KIND=OFFSET"),
        (base + ["--type-offset", "k_proj=-1.5"], r"in \(-1, 1\)"),
        (base + ["--type-offset", "k_proj=abc"], "not a number"),
        (base + ["--pattern", "2:4", "--type-offset", "k_proj=-0.2"], "unstructured"),
        (base + ["--sparsity", "0.9", "--type-offset", "q_proj=-0.9", "--type-offset", "k_proj=-0.9",
                 "--type-offset", "v_proj=-0.9", "--type-offset", "o_proj=-0.9"], "cannot keep a block"),
    ]


def test_each_user_error_is_one_line_nonzero_and_writes_nothing(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    for args, msg in _error_cases(tiny_dir, text_file, short):
        out = tmp_path / "never"
        code, o, e = _main(monkeypatch, capsys, *args, "--out", str(out))
        assert code != 0, args
        lines = [l for l in e.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, e)
        import re

        assert re.search(msg, " ".join(lines)), (msg, e)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")], args


def test_error_in_a_subprocess_exits_nonzero_with_one_line(tiny_dir, tmp_path):
    r = _cli("--model", str(tiny_dir), "--out", str(tmp_path / "x"), "--sparsity", "1.5")
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_existing_output_needs_overwrite(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, o, e = _main(monkeypatch, capsys, "--model", str(tiny_dir), "--out", str(out))
    assert code != 0 and "--overwrite" in e and (out / "keep.txt").read_text() == "mine"


def test_interrupted_run_leaves_nothing_complete_looking(tiny_dir, text_file, tmp_path, monkeypatch):
    import losa_deploy.artifact as ck
    from losa_deploy.compress import run_compress
    from losa_deploy.compress import Recipe

    real = ck.save_checkpoint

    def boom(directory, model, tok, masks):
        real(directory, model, tok, masks)  # the weights are on disk in the temporary dir...
        raise KeyboardInterrupt  # ...when the user hits Ctrl-C

    monkeypatch.setattr(ck, "save_checkpoint", boom)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_compress(Recipe.of(out=str(out), model=str(tiny_dir), calib_data=str(text_file), nsamples=2, seqlen=32),
                     progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_shipped_profiles_are_valid_recipes():
    from losa_deploy.profiles import list_profiles, load_profile, section
    from losa_deploy.compress import Recipe

    known = list_profiles()
    for name in ("cpu-50pct", "cpu-60pct", "cpu-70pct", "gpu-2of4", "cpu-mixed-2of8"):
        assert name in known
        p = load_profile(name)
        assert p["description"]
        sec = section(p, "compress")
        assert "../shared" not in json.dumps(sec)
        r = Recipe.from_settings(sec | {"out": "/nonexistent/x"})
        r.validate()
    assert load_profile("gpu-2of4")["export"]["format"] == "tensorrt"
    assert Recipe.from_settings(section(load_profile("cpu-mixed-2of8"), "compress")).target_sparsity == 0.75


@pytest.mark.integration
def test_real_model_wanda_50_small_calibration(shared_data, tmp_path):
    out = tmp_path / "real"
    r = _cli("--out", str(out), "--method", "wanda", "--sparsity", "0.5", "--calib-data",
             str(shared_data / "c4" / "c4_validation_2k.jsonl"), "--nsamples", "4", "--seqlen", "128",
             "--eval-data", str(shared_data / "wikitext-2-raw" / "wiki.test.raw"), "--eval-seqlen", "512",
             "--eval-max-tokens", "2048", "--no-eval-before", timeout=1800)
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "losa_manifest.json").read_text())
    assert len(man["blocks"]) == 30 and len(man["linears"]) == 210
    assert man["sparsity"]["realised_pruned_linears"] == pytest.approx(0.5, abs=1e-3)
    ppl = man["eval"]["after"]["perplexity"]
    assert 15 < ppl < 200  # dense is ~20 at 2048; 50% Wanda with 4x128 calibration must stay in that range
