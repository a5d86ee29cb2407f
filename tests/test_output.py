"""What the user reads: third-party noise silenced (and back under --debug), plain progress lines when stderr is not a
terminal, and a one-line verdict on a tokenizer that does not round-trip text (the broken-GGUF case)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from losa_deploy.errors import UserError

REPO = Path(__file__).resolve().parents[1]
LEGACY = "You are using the default legacy behaviour"


# --------------------------------------------------------------------------------------------------- quiet
@pytest.fixture(scope="module")
def legacy_tok_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer is a LlamaTokenizerFast without `legacy` in its config: every load makes
    transformers log its legacy-behaviour notice (the one GGUF-converted Llama tokenizers trigger)."""
    from tiny import byte_tokenizer, save_tiny
    from transformers import LlamaTokenizerFast

    d = save_tiny(tmp_path_factory.mktemp("legacy") / "model")
    bt = byte_tokenizer()
    LlamaTokenizerFast(tokenizer_object=bt._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                       add_bos_token=False).save_pretrained(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("legacy", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _run_cli(args: list[str], capfd, caplog) -> tuple[int, str, str]:
    """The real entry point in this process; transformers logs these notices once per process (warning_once), so
    its cache is cleared first. Its log handler holds whichever stderr existed when it was made, so the "stderr"
    returned is what reached the file descriptor plus every log record that got past the levels."""
    from losa_deploy.cli import main
    from transformers.utils import logging as tlog

    tlog.warning_once.cache_clear()
    capfd.readouterr()
    caplog.clear()
    code = 0
    sys.argv = ["losa-deploy", *args]
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    o = capfd.readouterr()
    return code, o.out, o.err + caplog.text


def test_third_party_notices_silenced_and_back_with_debug(legacy_tok_dir, text_file, capfd, caplog, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    args = ["evaluate", str(legacy_tok_dir), "--data", str(text_file), "--seqlen", "32", "--max-tokens", "64"]
    code, out, err = _run_cli(args, capfd, caplog)
    assert code == 0 and "perplexity" in out, err
    assert LEGACY not in err and "Warning" not in err, err
    code, out, err = _run_cli(["--debug", *args], capfd, caplog)
    assert code == 0, err
    assert LEGACY in err  # the same run under --debug shows the library's notice
    code, out, err = _run_cli(args, capfd, caplog)  # and a later quiet run is quiet again
    assert code == 0 and LEGACY not in err, err


def test_quiet_context_restores_levels():
    import logging
    import warnings

    from losa_deploy.quiet import quiet
    from transformers.utils import logging as tlog

    before = tlog.get_verbosity()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet():
            warnings.warn("library noise", FutureWarning)
            assert logging.getLogger("datasets").level == logging.ERROR
            assert tlog.get_verbosity() == logging.ERROR
        warnings.warn("after", UserWarning)
    assert [str(w.message) for w in seen] == ["after"]
    assert tlog.get_verbosity() == before


# ------------------------------------------------------------------------------------------------ progress
class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _plain(clock: _Clock, **kw):
    from losa_deploy.progress import PlainProgress

    buf = io.StringIO()
    return PlainProgress(Console(file=buf, width=200), clock=clock, **kw), buf


def test_plain_progress_lines_every_tenth_and_every_30s():
    clock = _Clock()
    prog, buf = _plain(clock, min_interval=5.0, max_interval=30.0)
    with prog:
        t = prog.add_task("pruning (wanda)", total=30)
        for _ in range(30):  # 10 s per block: a line per 10% step (3 blocks = 30 s), never more often than 5 s
            clock.t += 10.0
            prog.update(t, advance=1)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0] == "pruning (wanda): 3 of 30 (10%), elapsed 0:30, left ~4:30"
    assert lines[3] == "pruning (wanda): 12 of 30 (40%), elapsed 2:00, left ~3:00"
    assert lines[-1] == "pruning (wanda): 30 of 30 (100%), elapsed 5:00"

    clock.t = 0.0
    prog, buf = _plain(clock, min_interval=5.0, max_interval=30.0)
    with prog:
        t = prog.add_task("training", total=1000, loss="-")
        for i in range(100):  # 1 s per step, 10% takes 100 s: the 30 s cap prints in between
            clock.t += 1.0
            prog.update(t, advance=1, loss=f"{2.0 - i / 100:.2f}")
    lines = buf.getvalue().splitlines()
    assert lines == ["training: 30 of 1000 (3%), elapsed 0:30, left ~16:10, loss 1.71",
                     "training: 60 of 1000 (6%), elapsed 1:00, left ~15:40, loss 1.41",
                     "training: 90 of 1000 (9%), elapsed 1:30, left ~15:10, loss 1.11",
                     "training: 100 of 1000 (10%), elapsed 1:40, left ~15:00, loss 1.01"]


def test_short_step_prints_nothing_and_phases_print_names():
    clock = _Clock()
    prog, buf = _plain(clock)
    with prog:
        t = prog.add_task("perplexity", total=10)
        for _ in range(10):
            clock.t += 0.1
            prog.update(t, advance=1)
    assert buf.getvalue() == ""
    clock.t = 0.0
    prog, buf = _plain(clock, min_interval=5.0, max_interval=30.0)
    with prog:
        t = prog.add_task("suite", total=None)
        for step in ("torch dense: prefill", "torch dense: decode", "torch sparse: prefill"):
            clock.t += 20.0
            prog.update(t, description=f"suite: {step}")
    assert buf.getvalue().splitlines() == ["suite: torch dense: prefill (elapsed 0:20)",
                                           "suite: torch dense: decode (elapsed 0:40)",
                                           "suite: torch sparse: prefill (elapsed 1:00)"]


def test_make_progress_picks_by_terminal():
    from rich.progress import Progress

    from losa_deploy.progress import PlainProgress, make_progress

    assert isinstance(make_progress(console=Console(file=io.StringIO())), PlainProgress)
    assert isinstance(make_progress(console=Console(file=io.StringIO(), force_terminal=True)), Progress)
    assert isinstance(make_progress(console=Console(file=io.StringIO()), disable=True), Progress)


def test_perplexity_prints_plain_progress_to_captured_stderr(monkeypatch, capsys):
    """A real long step (perplexity windows) through the shared helper, stderr captured (not a terminal)."""
    import functools

    import losa_deploy.progress as lp
    from losa_deploy.evaluation.perplexity import perplexity
    from tiny import tiny_model

    ticks = iter(range(0, 1000, 7))  # every clock read is 7 s later: each window is a "long" step
    monkeypatch.setattr(lp, "PlainProgress", functools.partial(lp.PlainProgress, clock=lambda: float(next(ticks))))
    model = tiny_model("llama", layers=1)
    ids = torch.randint(0, 256, (5 * 16,))
    capsys.readouterr()
    perplexity(model, ids, 16)
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("perplexity:")]
    assert lines and lines[-1].startswith("perplexity: 5 of 5 (100%), elapsed"), cap.err
    assert "perplexity:" not in cap.out


def test_seqlen_beyond_context_is_our_one_line_note(capsys):
    from losa_deploy.evaluation.perplexity import perplexity
    from tiny import tiny_model

    model = tiny_model("llama", layers=1)
    model.config.max_position_embeddings = 8
    capsys.readouterr()
    perplexity(model, torch.randint(0, 256, (32,)), 16, progress=False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seqlen 16 is longer than the model's context (8 positions)" in err
    perplexity(model, torch.randint(0, 256, (32,)), 8, progress=False)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------ tokenizer probe
def _broken_tokenizer():
    """The byte-level BPE of tests/tiny.py without its ByteLevel decoder: what a GGUF whose metadata lost the
    decoder becomes. Decoding shows the raw byte symbols ('Ġ' for a space) instead of the text."""
    from tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok._tokenizer.decoder = None
    return tok


def test_tokenizer_probe_on_good_and_broken():
    from losa_deploy.models import tokenizer_roundtrip_problem
    from tiny import byte_tokenizer

    assert tokenizer_roundtrip_problem(byte_tokenizer()) is None
    why = tokenizer_roundtrip_problem(_broken_tokenizer())
    assert why is not None and "decode(encode(probe))" in why and "Ġ" in why


@pytest.fixture(scope="module")
def broken_tok_dir(tmp_path_factory) -> Path:
    from tiny import save_tiny

    d = save_tiny(tmp_path_factory.mktemp("broken") / "model")
    _broken_tokenizer().save_pretrained(d)
    return d


def test_broken_tokenizer_warns_on_load_and_stops_evaluation(broken_tok_dir, text_file, capsys, monkeypatch):
    from losa_deploy.cli import main
    from losa_deploy.models import load_model

    capsys.readouterr()
    load_model(str(broken_tok_dir))  # compress/bench and friends: one warning line, the work goes on
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning:" in err and "tokenizer" in err and "broken" in err, err
    with pytest.raises(UserError, match="meaningless"):
        load_model(str(broken_tok_dir), tokenizer_check="error")
    monkeypatch.setattr("sys.argv", ["losa-deploy", "evaluate", str(broken_tok_dir), "--data", str(text_file),
                                     "--seqlen", "32", "--max-tokens", "64"])
    with pytest.raises(SystemExit) as e:
        main()
    o = capsys.readouterr()
    assert e.value.code == 2 and "error:" in o.err and "broken" in o.err and "perplexity" not in o.out
