from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from losa_deploy.cli import app
from losa_deploy.data import calibration_ids, check_data_path, load_records, wikitext_rows
from losa_deploy.errors import UserError
from losa_deploy.evaluation.perplexity import perplexity
from losa_deploy.models import load_model, resolve_model

runner = CliRunner()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "losa_deploy.cli", *args], capture_output=True, text=True)


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for c in ("compress", "export", "bench", "evaluate", "profiles"):
        assert c in r.output


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and "losa-deploy" in r.output


def test_wikitext_rows_match_hf_convention():
    raw = " \n = Title = \n \n Body text .\n"
    rows = wikitext_rows(raw)
    assert rows == ["", " = Title = \n", "", " Body text .\n"]
    assert "\n\n".join(rows) == "\n\n = Title = \n\n\n\n\n Body text .\n"


def test_load_records_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    assert [r.text for r in load_records(str(tmp_path / "a.jsonl"))] == ["hello", "world"]
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi"}]))
    rec = load_records(str(tmp_path / "b.json"))[0]
    assert rec.text.endswith("### Response:\nHi") and rec.text.startswith(rec.prompt)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_records(str(tmp_path / "bad.json"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        load_records(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="unknown data source"):
        load_records("nosuchdataset")


def test_load_records_from_several_sources(tmp_path):
    """Shards named in one flag: read in order, a record repeated in a later shard read once."""
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\n{"text": "three"}\n')
    both = f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"
    assert [r.text for r in load_records(both)] == ["one", "two", "three"]
    check_data_path(both, "--train-data")
    with pytest.raises(UserError, match="--calib-data: data file .*missing.jsonl' not found"):
        check_data_path(f"{tmp_path / 'a.jsonl'},{tmp_path / 'missing.jsonl'}", "--calib-data")
    with pytest.raises(UserError, match="empty entry"):
        load_records(f"{tmp_path / 'a.jsonl'},")
    with pytest.raises(UserError, match="'self' cannot be combined"):
        check_data_path(f"self,{tmp_path / 'a.jsonl'}", "--train-data")
    comma = tmp_path / "x,y.jsonl"  # an existing path with a comma stays one source
    comma.write_text('{"text": "z"}\n')
    assert [r.text for r in load_records(str(comma))] == ["z"]


def test_calibration_deterministic_and_shaped(tiny_dir, text_file):
    _, tok = load_model(str(tiny_dir))
    a = calibration_ids(tok, str(text_file), nsamples=4, seqlen=32, seed=3)
    b = calibration_ids(tok, str(text_file), nsamples=4, seqlen=32, seed=3)
    c = calibration_ids(tok, str(text_file), nsamples=4, seqlen=32, seed=4)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(UserError, match="fewer than one window"):
        calibration_ids(tok, str(text_file), nsamples=1, seqlen=10**7)


def test_self_calibration(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOSA_DEPLOY_CACHE", str(tmp_path))
    m, tok = load_model(str(tiny_dir))
    a = calibration_ids(tok, "self", nsamples=3, seqlen=16, seed=1, model=m)
    b = calibration_ids(tok, "self", nsamples=3, seqlen=16, seed=1, model=m)
    assert a.shape == (3, 16) and torch.equal(a, b)


def test_prompted_self_text_mixes_answers_and_random_starts(tiny_dir, tmp_path, monkeypatch):
    """`self_prompted` 0.5: half the rows answer a prompt, cached under their own name; share 0 is unchanged."""
    from losa_deploy import selfdata

    monkeypatch.setenv("LOSA_DEPLOY_CACHE", str(tmp_path))
    m, tok = load_model(str(tiny_dir))
    plain = calibration_ids(tok, "self", nsamples=4, seqlen=12, seed=2, model=m)
    assert len(list((tmp_path / "selfdata").iterdir())) == 1
    mixed = calibration_ids(tok, "self", nsamples=4, seqlen=12, seed=2, model=m, self_prompted=0.5)
    assert mixed.shape == (4, 12) and len(list((tmp_path / "selfdata").iterdir())) == 2
    assert torch.equal(mixed, calibration_ids(tok, "self", nsamples=4, seqlen=12, seed=2, model=m, self_prompted=0.5))
    assert torch.equal(plain, selfdata.generate_self_ids(m, tok, 4, 12, seed=2))  # share 0: the cached text
    answers = selfdata.generate_self_ids(m, tok, 3, 12, seed=5, prompted=1.0)
    banned = set(selfdata.banned_ids(tok))
    assert banned >= {256, 257} and not banned & set(answers.flatten().tolist())
    assert m.config._attn_implementation == "sdpa"  # restored after the prompted batches


def test_prompt_ids_use_the_chat_template_when_there_is_one(tiny_dir):
    from losa_deploy.selfdata import PROMPT_GENRES, PROMPT_TOPICS, prompt_ids, prompt_requests

    requests = prompt_requests()
    assert len(set(requests)) == len(PROMPT_GENRES) * len(PROMPT_TOPICS)
    assert requests[0] == "Write a long news article about history."
    _, tok = load_model(str(tiny_dir))
    assert tok.decode(prompt_ids(tok, requests[0])).endswith("Write a long news article about history.\n\n")
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}<s>assistant: "
    assert tok.decode(prompt_ids(tok, "Write.")) == "<s>user: Write.</s><s>assistant: "


def test_left_padded_prompts_decode_as_each_prompt_alone(tiny_dir):
    """Prompts of different lengths share one left-padded batch through the grouped-query attention (with the
    sampler's mask, position ids and growing cache): every row's logits, at the prompt and over 6 decode steps,
    equal that prompt's decoded alone with transformers' own SDPA. Attending to the padding would change them."""
    from losa_deploy.selfdata import _growing_cache, grouped_query_attention

    m, _ = load_model(str(tiny_dir))
    assert m.config.num_key_value_heads < m.config.num_attention_heads
    prompts = [[5, 6, 7, 8, 9], [40, 41], [100, 101, 102]]
    follow = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(0))

    def decode(rows: list[list[int]], nxt: torch.Tensor, masked: bool = True) -> torch.Tensor:
        width = max(map(len, rows))
        ids = torch.tensor([[257] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        if not masked:
            mask = torch.ones_like(mask)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = []
        with torch.no_grad():
            o = m(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=_growing_cache(),
                  use_cache=True)
            out.append(o.logits[:, -1])
            for t in range(nxt.shape[1]):
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
                pos = pos[:, -1:] + 1
                o = m(input_ids=nxt[:, t : t + 1], attention_mask=mask, position_ids=pos,
                      past_key_values=o.past_key_values, use_cache=True)
                out.append(o.logits[:, -1])
        return torch.stack(out, 1)

    alone = torch.cat([decode([p], follow[i : i + 1]) for i, p in enumerate(prompts)], 0)
    with grouped_query_attention(m):
        assert m.config._attn_implementation != "sdpa"
        batch = decode(prompts, follow)
        unmasked = decode(prompts, follow, masked=False)
    assert m.config._attn_implementation == "sdpa"
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    assert (unmasked[1:] - alone[1:]).abs().max() > 1e-3


def test_top_k_top_p_sample_draws_from_the_renormalised_nucleus():
    """Hand case: probabilities 0.5, 0.3, 0.15, 0.05. top_k 4, top_p 0.7 keeps tokens 0 and 1 (the mass before token 2
    is 0.8), drawn 5:3. top_k 3 renormalises to 0.526, 0.316, 0.158: the mass before token 2 is 0.842, same nucleus.
    top_k 2 with top_p 0.5: the mass before token 1 is 0.625 > 0.5, so only token 0."""
    from losa_deploy.selfdata import top_k_top_p_sample

    probs = torch.tensor([[0.05, 0.3, 0.5, 0.15]]).repeat(4000, 1)  # sorted: token 2 (0.5), 1 (0.3), 3, 0
    for k in (4, 3):
        draws = top_k_top_p_sample(probs.log(), k, 0.7, torch.Generator().manual_seed(k)).flatten()
        assert set(draws.tolist()) == {1, 2}
        assert abs(float((draws == 2).float().mean()) - 0.625) < 0.03
    assert set(top_k_top_p_sample(probs.log(), 2, 0.5, torch.Generator()).flatten().tolist()) == {2}
    # top_p 1 with top_k 3: every token but the least likely, in proportion 0.5 : 0.3 : 0.15
    d = top_k_top_p_sample(probs.log() + 7.0, 3, 1.0, torch.Generator().manual_seed(0)).flatten()  # any offset
    assert set(d.tolist()) == {1, 2, 3} and abs(float((d == 3).float().mean()) - 0.15 / 0.95) < 0.03
    # random rows, peaked and flat: every draw lies in the nucleus of the renormalised top 64, computed by a full sort
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3000, generator=g) * torch.linspace(0.1, 8.0, 64)[:, None]
    p = torch.softmax(logits, -1)
    sp, si = p.sort(dim=-1, descending=True)
    sp, si = sp[:, :64] / sp[:, :64].sum(-1, keepdim=True), si[:, :64]
    nucleus = [set(si[r][(sp[r].cumsum(0) - sp[r]) < 0.95].tolist()) for r in range(64)]
    for seed in range(5):
        d = top_k_top_p_sample(logits, 64, 0.95, torch.Generator().manual_seed(seed)).flatten().tolist()
        assert all(d[r] in nucleus[r] for r in range(64))


def test_growing_kv_cache_decodes_like_the_default_cache(tiny_dir):
    """The self-text sampler's preallocated cache (buffers grown by doubling, views returned) gives the default
    cache's logits at every step, across a regrowth (64 -> 128 positions) and for a multi-token first chunk."""
    from losa_deploy.selfdata import _growing_cache

    m, _ = load_model(str(tiny_dir))
    ids = torch.randint(0, 256, (3, 80), generator=torch.Generator().manual_seed(0))
    cache = _growing_cache()
    assert cache is not None
    outs = {}
    for name, past in (("default", None), ("growing", cache)):
        logits = []
        with torch.no_grad():
            o = m(input_ids=ids[:, :5], past_key_values=past, use_cache=True)
            logits.append(o.logits[:, -1])
            for t in range(5, 80):
                o = m(input_ids=ids[:, t : t + 1], past_key_values=o.past_key_values, use_cache=True)
                logits.append(o.logits[:, -1])
        outs[name] = torch.stack(logits)
    assert torch.allclose(outs["default"], outs["growing"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        full = m(input_ids=ids).logits[:, -1]
    assert torch.allclose(outs["growing"][-1], full, atol=1e-4, rtol=1e-4)


def test_perplexity_protocol_matches_manual(tiny_dir):
    m, _ = load_model(str(tiny_dir))
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0))
    r = perplexity(m, ids, seqlen=32, progress=False)
    assert r.windows == 3 and r.tokens_evaluated == 96
    nll = 0.0
    for w in range(3):
        x = ids[w * 32 : (w + 1) * 32][None]
        with torch.no_grad():
            nll += float(m(input_ids=x, labels=x).loss) * 32
    assert math.isclose(r.perplexity, math.exp(nll / 96), rel_tol=1e-5)
    r2 = perplexity(m, ids, seqlen=32, max_tokens=64, progress=False)
    assert r2.windows == 2


def test_model_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(UserError, match="config.json"):
        resolve_model(str(tmp_path / "noconfig"))
    (tmp_path / "x.gguf").write_bytes(b"garbage")
    with pytest.raises(UserError, match="GGUF"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_unsupported_architecture(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unsupported architecture"):
        load_model(str(tmp_path))


def test_cli_errors_are_one_line(tiny_dir, tmp_path):
    cases = [
        ["evaluate", str(tmp_path / "nope")],
        ["evaluate", str(tiny_dir), "--data", str(tmp_path / "nope.txt")],
        ["evaluate", str(tiny_dir), "--data", "nosuchdataset"],
        ["evaluate", str(tiny_dir), "--seqlen", "1"],
        ["profiles", "show", "no-such-profile"],
    ]
    for args in cases:
        r = cli(*args)
        assert r.returncode != 0, args
        assert "Traceback" not in r.stderr, (args, r.stderr)
        assert r.stderr.strip().startswith("error:"), (args, r.stderr)


def test_cli_evaluate_json(tiny_dir, text_file, tmp_path):
    out = tmp_path / "ppl.json"
    r = cli("evaluate", str(tiny_dir), "--data", str(text_file), "--seqlen", "64", "--max-tokens", "256",
            "--json", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["seqlen"] == 64 and d["windows"] == 4 and d["perplexity"] > 1


@pytest.mark.integration
def test_real_model_perplexity_prefix(shared_data):
    """The embedded model on WikiText-2 test, first 4096 tokens at seqlen 2048 (fast check of the protocol)."""
    from losa_deploy.evaluation.perplexity import evaluate_perplexity

    m, tok = load_model("smollm2-135m")
    r = evaluate_perplexity(m, tok, str(shared_data / "wikitext-2-raw" / "wiki.test.raw"), 2048, max_tokens=4096,
                            progress=False)
    assert r.tokens_total == 304987
    assert r.windows == 2
    assert 10 < r.perplexity < 40


def test_losa_calibration_is_the_first_self_training_sequences(tiny_dir, tmp_path, monkeypatch):
    """LoSA on self text calibrates on its first training sequences: one generation, not two."""
    from losa_deploy.compress import Recipe
    from losa_deploy.compress.calibration import calibration_windows, shares_self_text
    from losa_deploy.compress.losa.train import build_train_samples

    monkeypatch.setenv("LOSA_DEPLOY_CACHE", str(tmp_path))
    m, tok = load_model(str(tiny_dir))
    r = Recipe.of(out=str(tmp_path / "o"), method="losa", nsamples=2, seqlen=16, train_samples=5, train_seqlen=16,
                  seed=3)
    assert shares_self_text(r)
    calib = calibration_windows(m, tok, r)
    train = build_train_samples(tok, "self", 5, 16, 3, model=m)
    assert calib.shape == (2, 16) and all(torch.equal(calib[i], train[i].input_ids) for i in range(2))
    for other in ({"train_seqlen": 32}, {"nsamples": 6}, {"method": "wanda"}, {"calib_data": "wikitext2"}):
        assert not shares_self_text(Recipe.of(**{**r.to_dict(), **other}))
