"""Architecture coverage beyond Llama on tiny random models built from each family's transformers config class
(tests/tiny.py: Qwen2, Qwen3, Mistral, Gemma, Gemma-2, Gemma-3, Phi-3): compress with every method and allocation
(spread over the architectures, LoSA on each), the exports' own verification (logits, greedy tokens, zero pattern)
for onnx / tensorrt / hf on each and deepsparse on Gemma-2 and Phi-3 (the others: integration), bench (torch runtime
and perplexity) on each (onnxruntime + deepsparse on Gemma-2 and Phi-3: integration), and the one-line refusals of
models the commands cannot take (GPT-2's Conv1D blocks, OPT in the KV-cache graph, a baseline of another
geometry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiny import ARCHS, SLIDING_WINDOW, save_tiny, tiny_config, tiny_model

from losa_deploy.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = [a for a in ARCHS if a != "llama"]  # Llama is covered by the other test files
PL, ML = 16, 48  # prompt 16 + 16 greedy tokens: twice the tiny sliding window

# One compress per architecture, so that every method, pattern and allocation runs on a non-Llama model
# (the exports below read these checkpoints). Phi-3's fused qkv_proj / gate_up_proj prune as single linears.
COMPRESS = {
    "qwen2": dict(method="sparsegpt", allocation="owl"),
    "qwen3": dict(method="wanda", allocation="rmi"),
    "mistral": dict(method="magnitude", allocation="atp", atp_beta=0.05),
    "gemma": dict(method="wanda", pattern="2:4"),
    "gemma2": dict(method="sparsegpt", pattern="mixed:8", sparsity=0.5, allocation="owl"),
    "gemma3": dict(method="wanda", allocation="atp", atp_beta="auto", atp_grid=2, tune_samples=2),
    "phi3": dict(method="sparsegpt", pattern="2:4"),
}
LOSA = dict(method="losa", sparsity=0.5, allocation="rmi", steps=2, rank_start=1, rank_end=2,
            rank_cap=2, train_samples=4, train_seqlen=16, batch_size=4, lr=1e-3,
            lora_dropout=0.0)


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch_dense")
    return {a: save_tiny(root / a, arch=a) for a in NEW}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, dense_dirs, text_file) -> dict[str, tuple[Path, dict]]:
    """{arch: (checkpoint dir, manifest)} from `run_compress` with the arch's COMPRESS settings."""
    from losa_deploy.compress import run_compress
    from losa_deploy.compress import Recipe

    root = tmp_path_factory.mktemp("arch_sparse")
    out = {}
    for a in NEW:
        kw = dict(sparsity=0.5) | COMPRESS[a]
        rec = Recipe.of(model=str(dense_dirs[a]), out=str(root / a), calib_data=str(text_file), nsamples=4,
                             seqlen=32, **kw)
        out[a] = (root / a, run_compress(rec, progress=False))
    return out


# ------------------------------------------------------------------------------------------- the tiny models
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_are_small_and_exercise_their_features(arch, tmp_path):
    """Guards the tests below: each feature must change the logits, or its export check could not fail."""
    model = tiny_model(arch)
    assert sum(p.numel() for p in model.parameters()) < 300_000
    ids = torch.randint(0, 256, (1, 3 * SLIDING_WINDOW), generator=torch.Generator().manual_seed(0))
    cfg = model.config
    if getattr(cfg, "sliding_window", None):  # the window masks something at this length
        wide = tiny_model(arch)
        wide.config.sliding_window = 10_000
        for layer in wide.model.layers:
            if getattr(layer.self_attn, "sliding_window", None):
                layer.self_attn.sliding_window = 10_000
        with torch.no_grad():
            assert (model(ids).logits - wide(ids).logits).abs().max() > 1e-3
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if arch == "phi3":
        assert {"qkv_proj", "gate_up_proj"} <= names and "q_proj" not in names
    if arch in ("qwen3", "gemma3"):
        assert {"q_norm", "k_norm"} <= names
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if arch == "gemma3":
        assert hasattr(model.model, "rotary_emb_local")
    if arch == "gemma2":  # both soft-cappings bite (eager attention applies them; SDPA would not)
        from losa_deploy.models import load_model

        d = save_tiny(tmp_path / "g2", arch="gemma2")
        m, _ = load_model(str(d))
        assert m.config._attn_implementation == "eager"
        with torch.no_grad():
            capped = m(ids).logits
            m.config.final_logit_softcapping = None
            uncapped_final = m(ids).logits
            for layer in m.model.layers:
                layer.self_attn.attn_logit_softcapping = None
            uncapped = m(ids).logits
        assert (capped - uncapped_final).abs().max() > 0.1 and (uncapped_final - uncapped).abs().max() > 0.1


# ------------------------------------------------------------------------------------------------ compress
@pytest.mark.parametrize("arch", NEW)
def test_compress_each_arch(arch, compressed, dense_dirs):
    from transformers import AutoModelForCausalLM

    from losa_deploy.checkpoint import load_masks

    out, man = compressed[arch]
    want = COMPRESS[arch]
    assert man["recipe"]["method"] == want["method"] and man["model"]["blocks_path"] == "model.layers"
    n_lin = 4 if arch == "phi3" else 7  # qkv_proj, o_proj, gate_up_proj, down_proj
    assert len(man["linears"]) == 4 * n_lin
    model = AutoModelForCausalLM.from_pretrained(out)
    masks = load_masks(out)
    for name, mask in masks.items():
        w = model.get_parameter(name)
        assert bool((w[~mask] == 0).all()), name
        if want.get("pattern") == "2:4":
            assert bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()), name
    if arch == "phi3":  # one fused weight, one mask: [3 * ... out, hidden in]
        assert masks["model.layers.0.self_attn.qkv_proj.weight"].shape == (64 + 2 * 2 * 16, 64)
    if want.get("allocation") in ("owl", "atp", "rmi") and want.get("pattern") != "2:4":
        rates = [b["rate"] for b in man["blocks"]]
        assert len(set(round(r, 6) for r in rates)) > 1 and sum(rates) / 4 == pytest.approx(0.5, abs=0.02)
    if want.get("atp_beta") == "auto":
        assert len(man["allocation"]["tuning"]["grid"]) == 3
    dense = AutoModelForCausalLM.from_pretrained(dense_dirs[arch])
    assert torch.equal(model.get_input_embeddings().weight, dense.get_input_embeddings().weight)


@pytest.mark.parametrize("arch", NEW + ["dense-lora"])
def test_losa_each_arch(arch, tmp_path, text_file):
    """One LoSA run per architecture at the smallest settings (and the dense-LoRA baseline once, on Phi-3)."""
    from losa_deploy.checkpoint import load_masks
    from losa_deploy.compress import run_compress
    from losa_deploy.compress import Recipe

    dense_lora = ("phi3", LOSA | {"method": "dense-lora", "allocation": "uniform"})
    a, kw = (arch, LOSA) if arch != "dense-lora" else dense_lora
    src = save_tiny(tmp_path / "dense", arch=a, layers=2)
    data = "self" if arch == "gemma3" else str(text_file)  # data-free text sampled through the model's own cache
    rec = Recipe.of(model=str(src), out=str(tmp_path / "out"), calib_data=data, nsamples=4, seqlen=16,
                         train_data=data, **kw)
    man = run_compress(rec, progress=False)
    assert man["sparsity"]["realised_pruned_linears"] == pytest.approx(0.5, abs=0.02)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, mask in load_masks(tmp_path / "out").items():
        assert bool((model.get_parameter(name)[~mask] == 0).all()), name
    assert all(not m._forward_hooks for m in model.modules())


# -------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("arch", NEW)
def test_export_onnx_tensorrt_hf_each_arch(arch, compressed, tmp_path):
    from exporters.compressed_tensors_export import export_compressed_tensors
    from exporters.onnx_export import export_onnx
    from exporters.tensorrt_export import export_tensorrt

    src, _ = compressed[arch]
    n = len(json.loads((src / "losa_manifest.json").read_text())["linears"])
    man = export_onnx(src, tmp_path / "onnx")
    v = man["verification"]
    assert v["onnxruntime_vs_torch"]["logits_ok"] and v["onnxruntime_vs_torch"]["tokens_match"]
    assert v["zero_pattern"] == {"ok": True, "checked": n, "missing": [], "violations": []}
    man = export_tensorrt(src, tmp_path / "trt", force_2of4=True, prefill_len=PL, max_len=ML)
    ort = man["verification"]["onnxruntime_fp16_vs_torch_fp32"]
    assert "skipped" not in ort and ort["logits_ok"] and ort["tokens_match"], ort
    assert man["verification"]["zero_pattern"]["ok"] and man["two_four"]["summary"]["eligible"] == n
    man = export_compressed_tensors(src, tmp_path / "hf")
    assert man["verification"]["decompressed_exact"]


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_export_deepsparse(arch, compressed, tmp_path):
    """Gemma-2: per-block sliding windows, soft-capping (Tanh) and (1 + w) norms in DeepSparse; Phi-3: fused
    projections, partial rotary and a window on every block. ~10 s each (two DeepSparse compiles)."""
    _deepsparse_parity(compressed[arch][0], tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma", "gemma3"])
def test_export_deepsparse_other_archs(arch, compressed, tmp_path):
    _deepsparse_parity(compressed[arch][0], tmp_path)


def _deepsparse_parity(src: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepsparse")
    from exporters.deepsparse_export import export_deepsparse
    from losa_deploy.runners import make_runner

    out = tmp_path / "ds"
    man = export_deepsparse(src, out, prefill_len=PL, max_len=ML, threads=1, verify_tokens=16)
    v = man["verification"]
    assert v["onnxruntime_vs_torch"]["logits_ok"] and v["onnxruntime_vs_torch"]["tokens_match"]
    assert v["deepsparse_vs_torch"]["tokens_match"] and v["deepsparse_vs_torch"]["max_abs_logit_diff"] <= 1e-3
    assert v["zero_pattern"]["ok"]
    # the runner bench uses: prefill in two chunks (left padding inside the window) + decode, against PyTorch
    from losa_deploy.models import load_model

    model, _ = load_model(str(src), attn_implementation="eager")
    ids = torch.randint(0, 256, (1, PL + 5), generator=torch.Generator().manual_seed(1))
    r = make_runner(out, "onnxruntime", prefill_len=PL, max_len=ML, threads=1)
    got = r.prefill(ids.numpy())[0]
    nxt = r.decode(7)
    with torch.no_grad():
        ref = model(torch.cat([ids, torch.tensor([[7]])], dim=1)).logits[0].numpy()
    assert abs(got - ref[:-1]).max() < 1e-3 and abs(nxt - ref[-1]).max() < 1e-3


# --------------------------------------------------------------------------------------------------- bench
@pytest.mark.parametrize("arch", NEW)
def test_bench_torch_each_arch(arch, compressed, dense_dirs, tmp_path, text_file, monkeypatch):
    """bench end to end (latency on the torch runtime, perplexity) with the machine probes stubbed: they measure
    the machine, not the architecture, and take seconds. ONNX Runtime / DeepSparse run the deepsparse export,
    which test_export_deepsparse verifies with the same runners."""
    import losa_deploy.bench.bounds as bounds
    from losa_deploy.bench.run import BenchOptions, run_bench

    monkeypatch.setattr(bounds, "measure_peak_flops", lambda threads: {"flops_per_s": 1e11, "method": "stub"})
    monkeypatch.setattr(bounds, "measure_bandwidth", lambda threads=None: {"bytes_per_s": 1e10, "method": "stub"})
    src, _ = compressed[arch]
    rep, _ = run_bench(BenchOptions(sparse_dir=src, baseline=str(dense_dirs[arch]), out=tmp_path / "b",
                                    runtimes=["torch"], threads=1, prompt_lens=(16,), decode_past=8, decode_tokens=2,
                                    gen_tokens=2, warmup=0, repeats=1, ppl_data=str(text_file), ppl_seqlen=32,
                                    ppl_max_tokens=64, progress=False))
    suite = rep["suites"][0]
    assert suite["runtimes"]["torch"]["status"] == "ok"
    assert suite["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert rep["accuracy"]["perplexity"]["sparse"]["perplexity"] > 1


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_bench_onnx_runtimes(arch, compressed, dense_dirs, tmp_path, text_file, monkeypatch):
    """bench's CPU headline (DeepSparse sparse vs ONNX Runtime dense) on the deepsparse exports of both models."""
    pytest.importorskip("deepsparse")
    import losa_deploy.bench.bounds as bounds
    from losa_deploy.bench.run import BenchOptions, run_bench

    monkeypatch.setattr(bounds, "measure_peak_flops", lambda threads: {"flops_per_s": 1e11, "method": "stub"})
    monkeypatch.setattr(bounds, "measure_bandwidth", lambda threads=None: {"bytes_per_s": 1e10, "method": "stub"})
    rep, _ = run_bench(BenchOptions(sparse_dir=compressed[arch][0], baseline=str(dense_dirs[arch]), out=tmp_path / "b",
                                    runtimes=["onnxruntime", "deepsparse"], threads=1, prompt_lens=(16,),
                                    decode_past=16, decode_tokens=2, gen_tokens=2, warmup=0, repeats=1,
                                    skip_accuracy=True, progress=False))
    suite = rep["suites"][0]
    assert all(suite["runtimes"][rt]["status"] == "ok" for rt in ("onnxruntime", "deepsparse")), suite["runtimes"]
    assert suite["headline"] == "deepsparse vs onnxruntime dense"


# --------------------------------------------------------------------------------------- what is refused
def _cli(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    from tiny import run_cli

    return run_cli(monkeypatch, capsys, *args)


def test_conv1d_blocks_refused_by_every_command(tmp_path, capsys, monkeypatch):
    gpt2 = save_tiny(tmp_path / "gpt2", arch="gpt2")
    llama = save_tiny(tmp_path / "llama", layers=2)
    msg = "GPT2LMHeadModel (model_type 'gpt2') is not supported: its decoder blocks (transformer.h) have no " \
          "torch.nn.Linear layer (they hold Conv1D)"
    for args in (["compress", "--model", str(gpt2), "--out", str(tmp_path / "c"), "--method", "magnitude"],
                 ["export", str(gpt2), "--format", "onnx", "--out", str(tmp_path / "e")],
                 ["export", str(gpt2), "--format", "hf", "--out", str(tmp_path / "e")],
                 ["bench", str(gpt2), "--baseline", str(gpt2), "--out", str(tmp_path / "b")]):
        code, out = _cli(capsys, monkeypatch, *args)
        lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and msg in lines[0] and "Traceback" not in out, (args, out)
    # a baseline of another architecture / geometry names the differences (GPT-2's n_embd read as its width)
    code, out = _cli(capsys, monkeypatch, "bench", str(llama), "--baseline", str(gpt2), "--out", str(tmp_path / "b"))
    assert code == 2 and "model_type llama vs gpt2" in out and "layers 2 vs 4" in out and "None" not in out
    assert not any((tmp_path / n).exists() for n in ("c", "e", "b"))


def test_kv_graph_refusals(tmp_path, capsys, monkeypatch):
    from exporters.wrapper import check_wrapper_support

    opt = save_tiny(tmp_path / "opt", arch="opt")
    code, out = _cli(capsys, monkeypatch, "export", str(opt), "--format", "tensorrt", "--out", str(tmp_path / "t"))
    assert code == 2 and "--format tensorrt cannot export this model: OPTForCausalLM (model_type 'opt')" in out
    code, out = _cli(capsys, monkeypatch, "bench", str(opt), "--baseline", str(opt), "--out", str(tmp_path / "b"),
                     "--runtimes", "onnxruntime")
    assert code == 2 and "--runtimes onnxruntime cannot bench this model: they run the deepsparse-format" in out
    cfg = tiny_config("qwen2")
    cfg.layer_types = ["chunked_attention"] * 4
    with pytest.raises(UserError, match="chunked_attention"):
        check_wrapper_support(cfg, "deepsparse")
    cfg = tiny_config("phi3")
    cfg.rope_scaling = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    cfg.original_max_position_embeddings = 64
    with pytest.raises(UserError, match=r"beyond 64 tokens.*--max-len 64 or less"):
        check_wrapper_support(cfg, "deepsparse", max_len=128)
    check_wrapper_support(cfg, "deepsparse", max_len=64)


def test_bench_skips_kv_runtimes_for_an_arch_without_the_graph(tmp_path):
    from losa_deploy.bench.run import onnx_runtimes_for

    skipped: dict[str, str] = {}
    run = onnx_runtimes_for(tiny_config("opt"), ["torch", "onnxruntime", "deepsparse"], skipped, explicit=False)
    assert run == ["torch"] and "model_type 'opt'" in skipped["onnxruntime"] and "deepsparse" in skipped
    assert onnx_runtimes_for(tiny_config("gemma3"), ["onnxruntime"], {}, explicit=True) == ["onnxruntime"]


def test_tensorrt_graph_check_catches_a_missing_sliding_window(compressed, tmp_path, monkeypatch):
    """Without its sliding-window mask the graph computes another model: the fp32 graph check refuses it."""
    import exporters.wrapper as wrapper
    from exporters.tensorrt_export import export_tensorrt

    monkeypatch.setattr(wrapper, "attention_layout", lambda config: ("full", None))
    with pytest.raises(UserError, match="does not reproduce MistralForCausalLM in fp32.*not written"):
        export_tensorrt(compressed["mistral"][0], tmp_path / "trt", force_2of4=True, prefill_len=PL, max_len=ML)
    assert not (tmp_path / "trt").exists()
