"""LoSA end to end on a tiny random Llama: exact sparsity, manifest content, resume == uninterrupted, errors."""

from __future__ import annotations

import json

import pytest
import torch

from losa_deploy.errors import UserError
from losa_deploy.compress.checks import check_against_model
from losa_deploy.compress.losa.run import run_losa
from losa_deploy.compress.methods import MethodInputs
from losa_deploy.compress.losa.state import STATE_FILE
from losa_deploy.compress import Recipe
from tiny import byte_tokenizer, tiny_model

SMALL = dict(layers=2, hidden=32, inter=64, heads=4, kv_heads=2)


def _recipe(tmp_path, text_file, **kw) -> Recipe:
    base = dict(out=str(tmp_path / "out"), method="losa", sparsity=0.5, allocation="rmi", calib_data=str(text_file),
                nsamples=8, seqlen=32, seed=0, steps=2, rank_start=2, rank_end=4, rank_cap=6,
                train_data=str(text_file), train_samples=12, train_seqlen=32, batch_size=4,
                lr=1e-3)
    base.update(kw)
    return Recipe.of(**base)


def _inputs(model, tok, rec, work) -> MethodInputs:
    return MethodInputs(rec, model, tok, None, work, progress=False)


def _zero_pattern_exact(model, masks):
    for name, mask in masks.items():
        w = model.get_parameter(name)
        assert bool((w[~mask] == 0).all()), name


def test_full_losa_run_tiny(tmp_path, text_file):
    model, tok = tiny_model("llama", **SMALL), byte_tokenizer()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = _recipe(tmp_path, text_file)
    res = run_losa(_inputs(model, tok, rec, tmp_path / "work"))
    assert len(res.masks) == 2 * 7
    _zero_pattern_exact(model, res.masks)
    # the final mean sparsity is the target; every block within the RMI box (delta 0.01 at S=0.5)
    kept = sum(int(m.sum()) for m in res.masks.values())
    total = sum(m.numel() for m in res.masks.values())
    assert abs(1 - kept / total - 0.5) < 0.02
    man = res.section
    assert [round(s["sparsity_target"], 4) for s in man["steps"]] == [0.4375, 0.5]
    assert [s["omega"] for s in man["steps"]] == [2.0, 4.0]
    for s in man["steps"]:
        assert sum(s["block_ranks"]) == 2 * s["omega"] and max(s["block_ranks"]) <= 6
        assert len(s["recon_error"]) == 2 and all(e > 0 for e in s["recon_error"])
        assert all(abs(r - s["sparsity_target"]) <= 0.0101 for r in s["block_rates"])
    assert len(man["loss_curve"]) == man["optimizer"]["total_steps"] == 4  # 12 samples / 2 steps / batch 4
    assert all(k in man["timings"] for k in ("rmi_s", "prune_s", "train_s", "merge_s"))
    assert man["dropout"] == 0.1 and man["adapter_form"] == "hook"
    json.dumps(man)  # manifest-ready
    assert (tmp_path / "work" / "losa_schedule.png").is_file() and "losa_schedule.png" in res.files
    assert (tmp_path / "work" / STATE_FILE).is_file()
    # no hooks left behind, training changed the kept weights (adapters merged), embeddings untouched
    assert all(not m._forward_hooks for m in model.modules())
    name = next(iter(res.masks))
    assert not torch.equal(model.get_parameter(name)[res.masks[name]], dense[name][res.masks[name]])
    assert torch.equal(model.get_parameter("model.embed_tokens.weight"), dense["model.embed_tokens.weight"])


def test_resume_equals_uninterrupted(tmp_path, text_file):
    tok = byte_tokenizer()
    rec = _recipe(tmp_path, text_file, steps=3, train_samples=9, nsamples=4, batch_size=2)
    m1 = tiny_model("llama", **SMALL)
    full = run_losa(_inputs(m1, tok, rec, tmp_path / "a"))

    class Stop(KeyboardInterrupt):
        pass

    def interrupt(step):
        if step == 1:
            raise Stop()

    m2 = tiny_model("llama", **SMALL)
    with pytest.raises(Stop):
        run_losa(_inputs(m2, tok, rec, tmp_path / "b"), on_step_end=interrupt)
    assert all(not m._forward_hooks for m in m2.modules())
    m3 = tiny_model("llama", **SMALL)  # a fresh process would reload the dense model
    rec.adapters.resume = True
    resumed = run_losa(_inputs(m3, tok, rec, tmp_path / "b"))
    assert resumed.section["resumed_from_step"] == 1
    assert full.masks.keys() == resumed.masks.keys()
    for n in full.masks:
        assert torch.equal(full.masks[n], resumed.masks[n]), n
        torch.testing.assert_close(m1.get_parameter(n), m3.get_parameter(n), rtol=0, atol=1e-6)
    assert full.section["loss_curve"] == pytest.approx(resumed.section["loss_curve"], rel=1e-5)


def test_resume_other_recipe_refused(tmp_path, text_file):
    tok = byte_tokenizer()
    rec = _recipe(tmp_path, text_file, steps=1, train_samples=2, nsamples=4)
    run_losa(_inputs(tiny_model("llama", **SMALL), tok, rec, tmp_path / "w"))
    other = _recipe(tmp_path, text_file, steps=1, train_samples=2, nsamples=4, lr=5e-4, resume=True)
    with pytest.raises(UserError, match=r"different recipe.*differs in: lr\)"):  # the profile key, not the field
        run_losa(_inputs(tiny_model("llama", **SMALL), tok, other, tmp_path / "w"))


def test_instruction_data_distill_and_nm(tmp_path, text_file):
    recs = [{"instruction": f"Say the word number {i}.", "input": "", "output": "word " * (5 + i % 7)}
            for i in range(30)]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(recs))
    tok = byte_tokenizer()
    model = tiny_model("llama", **SMALL)
    rec = _recipe(tmp_path, text_file, pattern="2:4", sparsity=None, train_data=str(data), nsamples=4,
                  objective="distill", train_samples=4, train_seqlen=256, mask_method="sparsegpt",
                  lora_dropout=0.0)
    res = run_losa(_inputs(model, tok, rec, tmp_path / "w"))
    _zero_pattern_exact(model, res.masks)
    assert res.section["adapter_form"] == "fused"  # no dropout: adapter and weight in one matmul
    assert all("forward" not in m.__dict__ for m in model.modules())  # and the class forward is back
    for m in res.masks.values():  # 2 kept of every 4 consecutive inputs
        assert bool((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all())
    assert res.section["objective"] == "distill"
    # under bf16 autocast (native bf16 CPUs) the teacher is a bf16 copy, else the model's fp32
    assert res.section["teacher_dtype"] == ("bfloat16" if res.section["autocast"] == "bfloat16" else "float32")
    assert res.patterns[next(iter(res.patterns))] == "2:4"


def test_lm_objective_masks_prompt_tokens(tmp_path):
    from losa_deploy.compress.losa.train import IGNORE, build_train_samples

    recs = [{"instruction": "Add one and one.", "input": "", "output": "Two."}]
    data = tmp_path / "a.json"
    data.write_text(json.dumps(recs))
    tok = byte_tokenizer()
    (s,) = build_train_samples(tok, str(data), 1, 512, seed=0)
    n_prompt = int((s.labels == IGNORE).sum())
    prompt_len = len(tok(recs and "Below is an instruction", add_special_tokens=True)["input_ids"])
    assert n_prompt > prompt_len  # the whole Alpaca prompt, not just its first words
    decoded = tok.decode(s.input_ids[n_prompt:])
    assert decoded.startswith("Two.")
    with pytest.raises(UserError, match="fewer than --train-samples"):
        build_train_samples(tok, str(data), 2, 512, seed=0)


@pytest.mark.parametrize("kw, msg", [
    (dict(steps=0), "steps"),
    (dict(rank_cap=0), "rank-cap"),
    (dict(rank_end=20), "rank-end"),
    (dict(allocation="owl"), "rmi"),
    (dict(train_samples=1), "train-samples"),
    (dict(allocation="atp"), "numeric --atp-beta"),
    (dict(allocation="atp", atp_beta="auto"), "numeric --atp-beta"),
])
def test_validation_errors(tmp_path, text_file, kw, msg):
    rec = _recipe(tmp_path, text_file, **kw)
    with pytest.raises(UserError, match=msg):
        rec.validate()


def test_atp_beta_capped_at_each_steps_legal_range():
    from losa_deploy.allocation import atp_beta_range
    from losa_deploy.compress.rates import capped_atp_beta

    # 30 blocks: at S_t = 0.7 the range is 0.3*2/29 = 0.02069 (beta 0.0118 passes unchanged); at S_t = 0.1 it is
    # 0.1*2/29 = 0.006897, so the same beta is capped just below that maximum.
    assert capped_atp_beta(0.0118, 30, 0.7) == 0.0118
    capped = capped_atp_beta(0.0118, 30, 0.1)
    assert capped == pytest.approx(0.2 / 29) and capped < atp_beta_range(30, 0.1)[1]


def test_losa_with_atp_rates(tmp_path, text_file):
    model, tok = tiny_model("llama", layers=4, hidden=32, inter=64, heads=4, kv_heads=2), byte_tokenizer()
    rec = _recipe(tmp_path, text_file, allocation="atp", atp_beta=0.05, sparsity=0.5)
    res = run_losa(_inputs(model, tok, rec, tmp_path / "work"))
    _zero_pattern_exact(model, res.masks)
    man = res.section
    last = man["steps"][-1]
    # ATP at S = 0.5, L = 4, beta = 0.05: 0.425, 0.475, 0.525, 0.575 (mean exactly S)
    assert last["block_rates"] == pytest.approx([0.425, 0.475, 0.525, 0.575])
    first_target = man["steps"][0]["sparsity_target"]  # 0.4375: legal max 2*0.4375/3 = 0.29 > 0.05, no cap
    assert man["atp_beta"] == {"recipe": 0.05, "per_step": [0.05, 0.05]} and first_target == pytest.approx(0.4375)


def test_losa_with_type_offsets_keeps_exact_block_sparsity(tmp_path, text_file):
    """k / v spared by 0.2 at every step (intermediate targets too); the merge stays exact."""
    model, tok = tiny_model("llama", **SMALL), byte_tokenizer()
    rec = _recipe(tmp_path, text_file, allocation="uniform", sparsity=0.6, type_offsets={"k_proj": -0.2,
                                                                                           "v_proj": -0.2})
    res = run_losa(_inputs(model, tok, rec, tmp_path / "work"))
    _zero_pattern_exact(model, res.masks)
    for name, mask in res.masks.items():
        pruned = int((~mask).sum())
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            assert pruned == round(0.4 * mask.numel()), name
        else:
            assert pruned > 0.6 * mask.numel(), name
    total = sum(m.numel() for m in res.masks.values())
    pruned = sum(int((~m).sum()) for m in res.masks.values())
    assert pruned == sum(round(0.6 * m.numel()) for m in res.masks.values()) and total > 0


def test_distill_without_room_refused(tmp_path, text_file, monkeypatch):
    import psutil

    class VM:
        available = 1000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM())
    rec = _recipe(tmp_path, text_file, objective="distill")
    with pytest.raises(UserError, match="teacher"):
        check_against_model(tiny_model("llama"), rec, "cpu")


def test_compress_losa_end_to_end_artefact(tiny_dir, text_file, tmp_path):
    """`compress --method losa` writes a plain HF checkpoint whose zeros are exactly the stored masks."""
    from transformers import AutoModelForCausalLM

    from losa_deploy.checkpoint import load_masks
    from losa_deploy.compress import run_compress
    from losa_deploy.artifact import read_manifest

    out = tmp_path / "out"
    rec = Recipe.of(out=str(out), model=str(tiny_dir), method="losa", sparsity=0.6, allocation="rmi",
                         calib_data=str(text_file), nsamples=4, seqlen=32, steps=2, rank_start=2,
                         rank_end=4, rank_cap=8, train_data=str(text_file), train_samples=4,
                         train_seqlen=32, batch_size=2, eval_before=False)
    run_compress(rec, progress=False)
    man = read_manifest(out)
    assert len(man["losa"]["steps"]) == 2 and man["losa"]["zero_pattern_verified"]
    assert [b["rank"] for b in man["blocks"]] == man["losa"]["ranks"]
    assert (out / "losa_schedule.png").is_file()
    assert not (tmp_path / ".out.losa-work").exists()  # the resume state is removed once the output is whole
    model = AutoModelForCausalLM.from_pretrained(out)
    masks = load_masks(out)
    assert len(masks) == 4 * 7
    for name, mask in masks.items():
        w = model.get_parameter(name)
        assert bool((w[~mask.bool()] == 0).all()), name
    kept = sum(int(m.bool().sum()) for m in masks.values())
    assert abs(1 - kept / sum(m.numel() for m in masks.values()) - 0.6) < 0.02


def test_dense_lora_baseline_tiny(tmp_path, text_file):
    """The naive baseline: prune, dense LoRA, merge, re-prune; final zeros are exactly the masks."""
    from losa_deploy.compress.losa.baseline import run_dense_lora

    model, tok = tiny_model("llama", **SMALL), byte_tokenizer()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = _recipe(tmp_path, text_file, method="dense-lora", nsamples=4, train_samples=8)
    rec.validate()
    res = run_dense_lora(_inputs(model, tok, rec, tmp_path / "work"))
    assert len(res.masks) == 2 * 7
    for name, mask in res.masks.items():
        w = model.get_parameter(name)
        assert torch.equal(w != 0, mask), name  # zero pattern == mask, exactly
    # per linear: every row within one weight of rate * in of its block's RMI rate; the mean is the target
    for name, mask in res.masks.items():
        assert abs(res.realised[name] - res.targets[name]) <= 1.0 / mask.shape[1] + 1e-6, name
    assert all(abs(r - 0.5) <= 0.0101 for r in res.block_rates)
    kept = sum(int(m.sum()) for m in res.masks.values())
    assert abs(1 - kept / sum(m.numel() for m in res.masks.values()) - 0.5) < 0.02
    man = res.section
    assert man["variant"] == "dense-lora" and man["rank"] == 4 and res.block_ranks == [4, 4]
    assert len(man["loss_curve"]) == man["optimizer"]["total_steps"] == 2  # 8 samples / batch 4, one shot
    sp = man["sparsity"]
    assert abs(sp["after_prune"] - 0.5) < 0.02 and sp["after_merge"] < 0.01 and abs(sp["after_reprune"] - 0.5) < 0.02
    assert [p["pass"] for p in man["passes"]] == ["prune", "re-prune"]
    assert all(k in man["timings"] for k in ("rmi_s", "prune_s", "train_s", "merge_s", "total_s"))
    json.dumps(man)
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(model.get_parameter("model.embed_tokens.weight"), dense["model.embed_tokens.weight"])
    assert not any((tmp_path / "work").glob("*"))  # nothing to resume from


def test_dense_lora_resume_refused(tmp_path, text_file, monkeypatch, capsys):
    import sys

    from losa_deploy import cli

    rec = _recipe(tmp_path, text_file, method="dense-lora", resume=True)
    with pytest.raises(UserError, match="--resume"):
        rec.validate()
    monkeypatch.setattr(sys, "argv", ["losa-deploy", "compress", "--method", "dense-lora", "--resume",
                                      "--model", "unused", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code != 0
    msg = capsys.readouterr().err
    assert "--resume" in msg and "dense-lora" in msg and len(msg.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
