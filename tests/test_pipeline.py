"""The sequential pipeline on tiny random models: generic block discovery, exact realised sparsity, equality with a
direct (non-pipeline) Wanda computation, the allocation visitors, masks/manifest artefacts."""

from __future__ import annotations

import json

import pytest
import torch

from tiny import tiny_model

from losa_deploy.errors import UserError
from losa_deploy.model_parts import block_param_counts, find_blocks, find_linears, prunable_linears
from losa_deploy.compress import Recipe
from losa_deploy.compress.prune import PruneSpec
from losa_deploy.compress.prune import RealisedSparsityError, check_realised, prune_sequential
from losa_deploy.compress.sequential import (
    block_compute,
    capture_block_inputs,
    collect_block_grams,
    collect_outlier_ratios,
    collect_wanda_stats,
    gather_stats,
    run_block,
)
from losa_deploy.pruning.masks import parse_pattern

ARCHS = ["llama", "mistral", "qwen2", "gemma", "opt"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n: int = 4, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, seqlen), generator=g)


def _row_exact(mask: torch.Tensor, s: float) -> bool:
    cols = mask.shape[1]
    k = int(s * cols + 1e-9)
    return bool(((~mask).sum(dim=1) == k).all())


@pytest.mark.parametrize("arch", ARCHS)
def test_find_blocks_and_prune_every_arch(arch):
    model = tiny_model(arch)
    name, blocks = find_blocks(model)
    assert len(blocks) == 4 and name in ("model.layers", "model.decoder.layers")
    lins = find_linears(blocks[0])
    assert len(lins) in (6, 7)  # OPT has q,k,v,out,fc1,fc2; the others 7
    emb_before = model.get_input_embeddings().weight.clone()
    head_before = model.get_output_embeddings().weight.clone()
    res = prune_sequential(model, _ids(), PruneSpec("wanda", parse_pattern("unstructured")), [0.5] * 4, progress=False)
    assert len(res.masks) == 4 * len(lins)
    for full, mask in res.masks.items():
        w = model.get_parameter(full)
        assert _row_exact(mask, 0.5), full
        assert bool((w[~mask] == 0).all()), full
        assert res.realised[full] == pytest.approx(0.5)
    assert torch.equal(model.get_input_embeddings().weight, emb_before)
    assert torch.equal(model.get_output_embeddings().weight, head_before)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_shapes_sparsegpt_2of4(kv_heads):
    model = tiny_model("llama", heads=4, kv_heads=kv_heads)
    res = prune_sequential(model, _ids(), PruneSpec("sparsegpt", parse_pattern("2:4")), [0.5] * 4, progress=False)
    for full, mask in res.masks.items():
        rows, cols = mask.shape
        assert bool((mask.reshape(rows, cols // 4, 4).sum(-1) == 2).all()), full
        assert res.patterns[full] == "2:4"
    k = res.masks["model.layers.0.self_attn.k_proj.weight"]
    assert k.shape == (kv_heads * 16, 64)


def _direct_wanda_masks(model, ids, block_index: int, s: float) -> dict[str, torch.Tensor]:
    """Wanda masks of one block computed the plain way: full-model forwards with input hooks, |W|*||x||, row sort."""
    name, blocks = find_blocks(model)
    lins = find_linears(blocks[block_index])
    sq = {k: torch.zeros(l.in_features) for k, l in lins.items()}
    def hook(k):
        def f(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            sq[k].add_((x * x).sum(0))  # returns None: a forward hook's return value would replace the output

        return f

    hooks = [l.register_forward_hook(hook(k)) for k, l in lins.items()]
    with torch.no_grad():
        for r in range(ids.shape[0]):
            model(input_ids=ids[r : r + 1], use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for k, l in lins.items():
        score = l.weight.abs() * sq[k].sqrt()
        kk = int(s * l.in_features)
        mask = torch.ones_like(l.weight, dtype=torch.bool)
        mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :kk], False)
        out[f"{name}.{block_index}.{k}.weight"] = mask
    return out


def test_wanda_pipeline_equals_direct_computation_blocks_0_and_1():
    ids = _ids(3, 20)
    model = tiny_model("llama")
    ref = tiny_model("llama")
    direct0 = _direct_wanda_masks(ref, ids, 0, 0.5)
    res = prune_sequential(model, ids, PruneSpec("wanda", parse_pattern("unstructured")), [0.5] * 4, progress=False)
    for k, m in direct0.items():
        assert torch.equal(res.masks[k], m), k
    # Block 1 must see the outputs of the *pruned* block 0 (sequential semantics).
    with torch.no_grad():
        for k, m in direct0.items():
            ref.get_parameter(k).mul_(m)
    direct1 = _direct_wanda_masks(ref, ids, 1, 0.5)
    for k, m in direct1.items():
        assert torch.equal(res.masks[k], m), k


def test_bf16_block_forwards_keep_statistics_float32():
    """--calib-dtype bfloat16 changes the block forwards only: a statistic whose input is computed in float32
    (q/k/v read the RMSNorm output) is bit-identical, the Hessian is accumulated in float32 (not a bf16 matmul),
    and the block outputs differ from float32 by bf16 rounding only."""
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    hidden, kwargs = capture_block_inputs(model, _ids(2, 16))
    blk = blocks[0]
    lins = find_linears(blk, ())
    ref, y_ref = gather_stats(blk, lins, hidden, kwargs, need_sq=True, need_h=True)
    with block_compute(torch.bfloat16):
        got, y = gather_stats(blk, lins, hidden, kwargs, need_sq=True, need_h=True)
        y2 = run_block(blk, hidden, kwargs)
    assert torch.equal(got["self_attn.q_proj"].H, ref["self_attn.q_proj"].H)
    assert torch.equal(got["self_attn.q_proj"].sq, ref["self_attn.q_proj"].sq)
    assert got["mlp.down_proj"].H.dtype == torch.float32
    assert not torch.equal(got["mlp.down_proj"].sq, ref["mlp.down_proj"].sq)  # its input came from bf16 matmuls
    assert y.dtype == torch.float32 and torch.equal(y, y2)
    assert not torch.equal(y, y_ref)
    assert torch.allclose(y, y_ref, rtol=0.05, atol=0.05)
    assert not torch.is_autocast_enabled("cpu")


def test_bf16_block_forwards_prune_to_exact_targets():
    ids = _ids(3, 20)
    m32, m16 = tiny_model("llama"), tiny_model("llama")
    r32 = prune_sequential(m32, ids, PruneSpec("wanda", parse_pattern("unstructured")), [0.5] * 4, progress=False)
    with block_compute(torch.bfloat16):
        r16 = prune_sequential(m16, ids, PruneSpec("wanda", parse_pattern("unstructured")), [0.5] * 4, progress=False)
    for k, m in r16.masks.items():
        assert _row_exact(m, 0.5), k
    same = sum(int((r16.masks[k] == r32.masks[k]).sum()) for k in r32.masks)
    agree = same / sum(m.numel() for m in r32.masks.values())
    assert agree > 0.95  # a few ties flip under bf16 rounding, most of the mask does not


def test_magnitude_masks_match_inline_magnitude_and_per_block_rates():
    model = tiny_model("llama")
    ref = tiny_model("llama")
    rates = [0.2, 0.4, 0.6, 0.8]
    spec = PruneSpec("magnitude", parse_pattern("unstructured"))
    res = prune_sequential(model, None, spec, rates, progress=False)  # no data needed
    assert res.timings["forward_s"] == 0.0
    for full, (bi, lin) in prunable_linears(ref).items():
        w = lin.weight.detach()
        rows, cols = w.shape
        total = int(rates[bi] * rows * cols + 0.5 + 1e-9)  # the layer's exact count, rounded half up
        srt = torch.sort(w.abs(), dim=1, stable=True)
        k = [total // rows] * rows  # every row, then one more in the rows whose next-smallest |w| is smallest
        for r in torch.sort(srt.values[:, total // rows], stable=True).indices[: total - rows * (total // rows)]:
            k[int(r)] += 1
        expect = torch.ones_like(w, dtype=torch.bool)
        for r in range(rows):
            expect[r, srt.indices[r, : k[r]]] = False
        assert torch.equal(res.masks[full], expect), full
    assert res.block_rates == rates


def test_mixed_pattern_uses_per_block_n():
    model = tiny_model("llama")
    spec = PruneSpec("wanda", parse_pattern("mixed:8"), n_per_block=[4, 3, 1, 0])
    res = prune_sequential(model, _ids(), spec, [0.5, 0.625, 0.875, 1.0 - 1e-9], progress=False)
    for full, mask in res.masks.items():
        bi = int(full.split(".")[2])
        n = [4, 3, 1, 0][bi]
        rows, cols = mask.shape
        assert bool((mask.reshape(rows, cols // 8, 8).sum(-1) == n).all())
        assert res.patterns[full] == f"{n}:8"


def test_ignore_keeps_layers_dense():
    model = tiny_model("llama")
    before = model.model.layers[2].mlp.down_proj.weight.clone()
    spec = PruneSpec("wanda", parse_pattern("unstructured"), ignore=("*.down_proj.weight", "model.layers.0.*"))
    res = prune_sequential(model, _ids(), spec, [0.5] * 4, progress=False)
    assert not any(k.endswith("down_proj.weight") or k.startswith("model.layers.0.") for k in res.masks)
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, before)
    assert "model.layers.1.self_attn.q_proj.weight" in res.masks


def test_offload_gives_the_same_result():
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = prune_sequential(a, _ids(), PruneSpec("sparsegpt", parse_pattern("unstructured")), [0.6] * 4, progress=False)
    rb = prune_sequential(b, _ids(), PruneSpec("sparsegpt", parse_pattern("unstructured")), [0.6] * 4, offload=True,
                          progress=False)
    for k in ra.masks:
        assert torch.equal(ra.masks[k], rb.masks[k])
        assert torch.allclose(a.get_parameter(k), b.get_parameter(k), atol=1e-6)


def test_sparsegpt_updates_kept_weights_and_beats_masking_alone():
    ids = _ids(8, 32)
    dense = tiny_model("llama")
    m = tiny_model("llama")
    res = prune_sequential(m, ids, PruneSpec("sparsegpt", parse_pattern("unstructured")), [0.5] * 4, progress=False,
                           dense_state={k: v.clone() for k, v in dense.state_dict().items()})
    w0 = dense.model.layers[0].self_attn.q_proj.weight
    w1 = m.model.layers[0].self_attn.q_proj.weight
    mask = res.masks["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(w1[mask], w0[mask])  # OBS update changed kept weights
    # Same masks without the update: reconstruction error of block 0 must be larger.
    plain = tiny_model("llama")
    with torch.no_grad():
        for k, mk in res.masks.items():
            plain.get_parameter(k).mul_(mk)
    hidden, kw = capture_block_inputs(dense, ids)
    from losa_deploy.compress.prune import recon_error
    from losa_deploy.compress.sequential import run_block

    d = run_block(dense.model.layers[0], hidden, kw)
    e_sgpt = recon_error(d, run_block(m.model.layers[0], hidden, kw))
    e_mask = recon_error(d, run_block(plain.model.layers[0], hidden, kw))
    assert e_sgpt < e_mask
    assert res.recon_error[0] == pytest.approx(e_sgpt, rel=1e-4)


def test_recon_error_zero_when_nothing_pruned_and_grows_with_depth_of_damage():
    dense = tiny_model("llama")
    m = tiny_model("llama")
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    res = prune_sequential(m, _ids(), PruneSpec("wanda", parse_pattern("unstructured")), [0.0] * 4, dense_state=state,
                           progress=False)
    assert res.recon_error == pytest.approx([0.0] * 4, abs=1e-6)
    res = prune_sequential(tiny_model("llama"), _ids(), PruneSpec("wanda", parse_pattern("unstructured")), [0.7] * 4,
                           dense_state=state, progress=False)
    assert len(res.recon_error) == 4 and all(e > 0 for e in res.recon_error)


def test_block_grams_first_block_equals_embedding_gram():
    model = tiny_model("llama")
    ids = _ids(5, 16)
    grams = collect_block_grams(model, ids, progress=False)
    assert len(grams) == 4 and grams[0].dtype == torch.float64 and grams[0].shape == (5, 5)
    X = model.model.embed_tokens(ids).detach().reshape(5, -1).double()
    assert torch.allclose(grams[0], X @ X.T, rtol=1e-6)
    # later blocks: the dense hidden states (output_hidden_states gives every block's input)
    with torch.no_grad():
        hs = [model(input_ids=ids[i : i + 1], output_hidden_states=True).hidden_states for i in range(5)]
    X2 = torch.cat([h[2] for h in hs]).reshape(5, -1).double()
    assert torch.allclose(grams[2], X2 @ X2.T, rtol=1e-5)


def test_outlier_ratios_and_wanda_stats():
    model = tiny_model("llama")
    ids = _ids()
    sq = collect_wanda_stats(model, ids, progress=False)
    assert len(sq) == 28
    r = collect_outlier_ratios(model, ids, 5.0, progress=False, sq_stats=sq)
    assert len(r) == 4 and all(0.0 <= x <= 1.0 for x in r)
    assert r == collect_outlier_ratios(model, ids, 5.0, progress=False)


def test_check_realised_fails_loudly():
    w = torch.randn(4, 8)
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[:, :4] = False
    w2 = w * mask
    assert check_realised("x", w2, mask, 0.5, 0, 0) == 0.5
    with pytest.raises(RealisedSparsityError):
        check_realised("x", w, mask, 0.5, 0, 0)  # weights not zeroed
    with pytest.raises(RealisedSparsityError):
        check_realised("x", w2, mask, 0.75, 0, 0)  # too few pruned
    with pytest.raises(RealisedSparsityError):
        check_realised("x", w2, mask, 0.5, 2, 4)  # first group keeps 0, not 2


def test_masks_saved_equal_zero_pattern_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    from losa_deploy.checkpoint import load_masks, save_checkpoint
    from tiny import byte_tokenizer

    model = tiny_model("llama")
    res = prune_sequential(model, _ids(), PruneSpec("wanda", parse_pattern("unstructured")), [0.5] * 4, progress=False)
    save_checkpoint(tmp_path, model, byte_tokenizer(), res.masks)
    masks = load_masks(tmp_path)
    assert set(masks) == set(res.masks)
    re = AutoModelForCausalLM.from_pretrained(tmp_path)
    for k, mk in masks.items():
        assert mk.dtype == torch.bool and torch.equal(mk, res.masks[k])
        assert torch.equal(re.get_parameter(k) != 0, mk)  # random weights: no natural zeros
    (tmp_path / "sparsity_masks.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_masks(tmp_path)
    with pytest.raises(UserError, match="no sparsity_masks"):
        load_masks(tmp_path / "nope")


def test_manifest_round_trip_and_errors(tmp_path):
    from losa_deploy.artifact import read_manifest, write_manifest
    from losa_deploy.manifest import build_manifest

    man = build_manifest(recipe=Recipe.of(out="x").to_dict(), blocks=[{"index": 0, "rate": 0.5}],
                         linears={"a.weight": {"target": 0.5, "realised": 0.5, "pattern": "unstructured"}})
    write_manifest(tmp_path, man)
    back = read_manifest(tmp_path)
    assert back == json.loads(json.dumps(man))
    assert back["schema"] == "losa-deploy/compress" and back["version"] == 1 and "torch" in back["versions"]
    with pytest.raises(UserError, match="no losa_manifest.json"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "losa_manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        read_manifest(tmp_path)
    other = {"schema": "other", "version": 1, "recipe": {}, "blocks": [], "linears": {}}
    (tmp_path / "losa_manifest.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="schema"):
        read_manifest(tmp_path)


def test_block_param_counts_and_prunable_names():
    model = tiny_model("llama")
    counts = block_param_counts(model)
    assert len(set(counts)) == 1 and counts[0] == 64 * 64 * 2 + 2 * (32 * 64) + 3 * (64 * 128)
    names = prunable_linears(model)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" not in names


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"sparsity": 1.0}, r"\[0, 1\)"),
        ({"sparsity": -0.1}, r"\[0, 1\)"),
        ({"method": "obs"}, "unknown method"),
        ({"pattern": "2-4"}, "pattern"),
        ({"allocation": "magic"}, "unknown allocation"),
        ({"pattern": "2:4", "sparsity": 0.7}, "means 0.5 sparsity"),
        ({"pattern": "2:4", "allocation": "owl"}, "mixed:4"),
        ({"atp_beta": "abc", "allocation": "atp"}, "number or 'auto'"),
        ({"atp_beta": 0.01}, "only applies"),
        ({"calib_data": "/no/such/file.txt"}, "not found"),
        ({"nsamples": 0}, "nsamples"),
        ({"method": "losa", "lora_dropout": 1.0}, r"--lora-dropout must be in \[0, 1\)"),
        ({"method": "losa", "lora_alpha": 0.0}, "--lora-alpha must be > 0"),
        ({"calib_dtype": "int8"}, "unknown --calib-dtype 'int8'"),
    ],
)
def test_recipe_validation(tmp_path, kw, msg):
    with pytest.raises(UserError, match=msg):
        Recipe.of(out=str(tmp_path / "o"), **kw).validate()


def test_recipe_from_settings_aliases_and_unknown():
    r = Recipe.from_settings({"out": "x", "rank-start": 4, "steps": 3, "ignore": "*.down_proj.weight"})
    assert r.adapters.rank_start == 4 and r.adapters.steps == 3 and r.prune.ignore == ["*.down_proj.weight"]
    with pytest.raises(UserError, match="unknown compress setting"):
        Recipe.from_settings({"out": "x", "sparsty": 0.5})
    assert Recipe.of(out="x", pattern="2:4").target_sparsity == 0.5
    assert Recipe.of(out="x").target_sparsity == 0.5


def test_sparsegpt_damping_retry_is_reported_naming_the_layer(monkeypatch, capsys):
    import losa_deploy.pruning.sparsegpt as sg

    real = sg.sparsegpt_prune

    def flaky(weight, hessian, sparsity, n=0, m=0, blocksize=128, percdamp=0.01, **kw):
        w, mask, info = real(weight, hessian, sparsity, n, m, blocksize, percdamp, **kw)
        if kw.get("name", "").endswith("layers.1.mlp.up_proj.weight"):
            info = dict(info, damping_retries=2, damp=1.0)
        return w, mask, info

    monkeypatch.setattr(sg, "sparsegpt_prune", flaky)
    spec = PruneSpec("sparsegpt", parse_pattern("unstructured"))
    res = prune_sequential(tiny_model("llama"), _ids(), spec, [0.5] * 4, progress=False)
    assert len(res.warnings) == 1 and "model.layers.1.mlp.up_proj.weight" in res.warnings[0]
    assert "Cholesky" in capsys.readouterr().err


def test_sliding_window_blocks_get_their_own_mask():
    """Qwen2 with a sliding window on the upper blocks: the replayed pipeline must reproduce the model's own
    forward exactly (block outputs == output_hidden_states), which needs each block's own attention mask."""
    from transformers import Qwen2Config, AutoModelForCausalLM

    from losa_deploy.compress.sequential import walk_blocks

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, use_sliding_window=True, sliding_window=8,
                      max_window_layers=2, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = _ids(2, 24)
    seen: list[torch.Tensor] = []
    walk_blocks(model, ids, lambda i, p, b, h, kw: seen.append(h.clone()), progress=False)
    with torch.no_grad():
        hs = [model(input_ids=ids[r : r + 1], output_hidden_states=True).hidden_states for r in range(2)]
    for i in range(4):
        expect = torch.cat([h[i] for h in hs])
        assert torch.allclose(seen[i], expect, atol=1e-5), i


def test_one_name_per_setting_flag_profile_key_field(tmp_path):
    """Every recipe setting is a `compress` option of the same name, and the manifest's recipe reads back as is."""
    import inspect

    from losa_deploy.cli.compress import compress
    from losa_deploy.compress.recipe import setting_sections

    params = set(inspect.signature(compress).parameters) - {"profile", "json_out"}
    settings = set(setting_sections()) - {"blocksize", "percdamp", "atp_grid", "tune_samples"}  # profile-only
    assert params == settings
    r = Recipe.of(out=str(tmp_path / "o"), pattern="mixed:8", sparsity=0.75, rank_start=3, lora_dropout=0.0)
    again = Recipe.from_settings(r.to_dict())
    assert again == r and again.prune.pattern.kind == "mixed" and again.adapters.lora_dropout == 0.0


def test_cached_dense_reference_gives_the_same_recon_errors():
    """LoSA prunes T times against the same dense reference: the cached outputs must equal recomputed ones."""
    dense = tiny_model("llama")
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    cache: dict = {}
    spec = PruneSpec("wanda", parse_pattern("unstructured"))
    first = prune_sequential(tiny_model("llama"), _ids(), spec, [0.5] * 4, dense_state=state, progress=False,
                             dense_outputs=cache)
    assert sorted(cache) == [0, 1, 2, 3]
    for rate in (0.5, 0.7):
        plain = prune_sequential(tiny_model("llama"), _ids(), spec, [rate] * 4, dense_state=state, progress=False)
        cached = prune_sequential(tiny_model("llama"), _ids(), spec, [rate] * 4, dense_state=state, progress=False,
                                  dense_outputs=cache)
        assert cached.recon_error == plain.recon_error
        for k in plain.masks:
            assert torch.equal(cached.masks[k], plain.masks[k])
    assert first.recon_error == prune_sequential(
        tiny_model("llama"), _ids(), PruneSpec("wanda", parse_pattern("unstructured")), [0.5] * 4, dense_state=state,
        progress=False).recon_error


def test_type_offset_without_such_linear_warns_and_changes_nothing():
    """phi3 fuses q, k, v into qkv_proj: a k_proj offset matches nothing, so every linear keeps the block rate."""
    spec = PruneSpec("wanda", parse_pattern("unstructured"), type_offsets={"k_proj": -0.2})
    res = prune_sequential(tiny_model("phi3"), _ids(), spec, [0.5] * 4, progress=False)
    assert any("k_proj" in w and "ignored" in w for w in res.warnings)
    assert all(t == 0.5 for t in res.targets.values())


def test_type_offsets_from_a_profile_merge_per_kind_with_flags(tmp_path):
    prof = {"compress": {"method": "wanda", "type_offsets": {"k_proj": -0.2, "v_proj": -0.2}}}
    r = Recipe.from_profile(prof, {"out": str(tmp_path / "o"), "type_offsets": ["v_proj=0"]})
    assert r.prune.type_offsets == {"k_proj": -0.2, "v_proj": 0.0}
    assert Recipe.from_profile(prof, {"out": str(tmp_path / "o")}).prune.type_offsets == {"k_proj": -0.2,
                                                                                          "v_proj": -0.2}
