"""Faults and bad input: checkpoints whose weights left their masks, signals (real child processes), stale partial
outputs, environment faults (read-only or full disk, permissions, missing directories, truncated weights), bench's
input and output handling, file modes, and the names messages use. README "What happens when things go wrong"
names these tests row by row."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in-process through `main()` (the console script's error handling)."""
    from losa_deploy import cli

    monkeypatch.setattr(sys, "argv", ["losa-deploy", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = int(e.code or 0)
    o, e = capsys.readouterr()
    return code, o, e


def _one_error_line(err: str) -> str:
    """The error is one line (progress lines such as 'loading ...' may come before it), with no traceback."""
    lines = [ln for ln in err.strip().splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory) -> Path:
    """A tiny Llama compressed to 50% by magnitude (no data needed), as `compress` writes it."""
    from tiny import save_tiny

    from losa_deploy.compress import run_compress
    from losa_deploy.compress import Recipe

    root = tmp_path_factory.mktemp("faults")
    dense = save_tiny(root / "dense", layers=2)
    out = root / "sparse"
    run_compress(Recipe.of(out=str(out), model=str(dense), method="magnitude", sparsity=0.5), progress=False)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tamper(d: Path, q_entries: int = 50, down: bool = True) -> None:
    """The issue's case: `q_entries` masked entries of one q_proj set non-zero; every masked entry of one down_proj
    set to 0.01."""
    from losa_deploy.artifact import load_masks

    masks = load_masks(d)
    f = d / "model.safetensors"
    state = load_file(str(f))
    if q_entries:
        w, keep = state[Q].clone(), masks[Q]
        idx = (~keep).reshape(-1).nonzero().reshape(-1)[:q_entries]
        w.view(-1)[idx] = 0.5
        state[Q] = w
    if down:
        state[DOWN] = torch.where(masks[DOWN], state[DOWN], torch.full_like(state[DOWN], 0.01))
    save_file(state, str(f), metadata={"format": "pt"})


# ---- masks are the contract -------------------------------------------------------------------------------------

def test_masked_nonzeros_hand_computed():
    from losa_deploy.artifact import masked_nonzeros

    w = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, -3.0]])
    keep = torch.tensor([[True, True, False], [False, True, True]])
    assert masked_nonzeros(w, keep) == 1  # only w[0, 2]: masked and non-zero
    assert masked_nonzeros(w * keep, keep) == 0


def test_tampered_checkpoint_refused_by_every_consumer(sparse_dir, text_file, tmp_path, monkeypatch, capsys):
    bad = _copy(sparse_dir, tmp_path / "bad")
    _tamper(bad)
    n_down = int((~load_file(str(bad / "sparsity_masks.safetensors"))[DOWN].bool()).sum())
    runs = {
        "export hf": ["export", str(bad), "--format", "hf", "--out", str(tmp_path / "x_hf")],
        "export onnx": ["export", str(bad), "--format", "onnx", "--out", str(tmp_path / "x_onnx")],
        "export tensorrt": ["export", str(bad), "--format", "tensorrt", "--out", str(tmp_path / "x_trt")],
        "evaluate": ["evaluate", str(bad), "--data", str(text_file), "--seqlen", "32", "--max-tokens", "64"],
        "bench": ["bench", str(bad), "--baseline", str(sparse_dir.parent / "dense"),
                  "--out", str(tmp_path / "x_bench"),
                  "--skip-latency", "--skip-accuracy"],
        "generate": ["generate", str(bad), "--runtime", "torch", "--prompt", "abc", "--max-new-tokens", "2"],
    }
    import importlib.util

    if importlib.util.find_spec("deepsparse") is not None:
        runs["export deepsparse"] = ["export", str(bad), "--format", "deepsparse", "--out", str(tmp_path / "x_ds")]
    for what, args in runs.items():
        code, o, e = _main(monkeypatch, capsys, *args)
        line = _one_error_line(e)
        assert code == 2, (what, e)
        want = f"{Q} has 50 non-zero weights where sparsity_masks.safetensors says pruned (and 1 more tensor)"
        assert want in line, (what, line)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".x", "x_"))]  # nothing written, not even a folder

    only_down = _copy(sparse_dir, tmp_path / "only_down")
    _tamper(only_down, q_entries=0)
    code, o, e = _main(monkeypatch, capsys, "export", str(only_down), "--format", "hf", "--out", str(tmp_path / "y"))
    assert code == 2 and f"{DOWN} has {n_down} non-zero weights" in _one_error_line(e)


def test_intact_checkpoint_passes_and_no_masks_is_a_note(sparse_dir, text_file, tmp_path, monkeypatch, capsys):
    code, o, e = _main(monkeypatch, capsys, "export", str(sparse_dir), "--format", "hf", "--out", str(tmp_path / "ok"))
    assert code == 0, e
    assert "note:" not in e
    nomask = _copy(sparse_dir, tmp_path / "nomask")
    _tamper(nomask)
    (nomask / "sparsity_masks.safetensors").unlink()  # without masks, nothing to disagree with: taken as they are
    code, o, e = _main(monkeypatch, capsys, "export", str(nomask), "--format", "hf", "--out", str(tmp_path / "ok2"))
    assert code == 0, e
    notes = [ln for ln in e.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "no sparsity_masks.safetensors" in notes[0] and "dense" in notes[0]
    # evaluate notes it for a compress output only: it is as often given a dense model
    ev = ["--data", str(text_file), "--seqlen", "32", "--max-tokens", "64"]
    code, o, e = _main(monkeypatch, capsys, "evaluate", str(nomask), *ev)
    assert code == 0 and "note: " in e and "no sparsity_masks.safetensors" in e, e
    code, o, e = _main(monkeypatch, capsys, "evaluate", str(sparse_dir.parent / "dense"), *ev)
    assert code == 0 and "note:" not in e, e


# ---- interruption: real child processes -------------------------------------------------------------------------

_CHILD = r"""
import os, sys, time
import losa_deploy.artifact as artifact
import losa_deploy.compress.losa.run as losa_run

def pause(real):
    def wrapped(directory, *a, **k):
        r = real(directory, *a, **k)
        with open(os.environ["READY"], "w") as f:
            f.write(str(directory))
        time.sleep(120)  # the parent sends its signal now
        return r
    return wrapped

if os.environ["PAUSE_AT"] == "checkpoint":
    artifact.save_checkpoint = pause(artifact.save_checkpoint)
else:  # after LoSA's first step checkpoint
    losa_run.save_state = pause(losa_run.save_state)
sys.argv = ["losa-deploy", "compress", *sys.argv[1:]]
from losa_deploy.cli import main
main()
"""


def _losa_args(tiny: Path, text: Path) -> list[str]:
    return ["--method", "losa", "--sparsity", "0.5", "--allocation", "uniform", "--calib-data", str(text),
            "--nsamples", "4", "--seqlen", "32", "--steps", "2", "--rank-start", "2", "--rank-end", "4",
            "--rank-cap", "6", "--train-data", str(text), "--train-samples", "4", "--train-seqlen", "32",
            "--batch-size", "2"]


def _foreground_signals() -> None:
    """The child gets the signal dispositions of a run started at a terminal, whatever started the tests (CI and
    `nohup` start them with SIGINT/SIGHUP ignored, which the child would inherit and, rightly, keep)."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def _start(tmp_path: Path, name: str, args: list[str], pause_at: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "child.py"
    if not script.exists():  # written once: rewriting it while an earlier child reads it gives that child an empty file
        tmp = tmp_path / ".child.py.tmp"
        tmp.write_text(_CHILD)
        tmp.replace(script)
    ready = tmp_path / f"{name}.ready"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), READY=str(ready), PAUSE_AT=pause_at)
    with open(tmp_path / f"{name}.err", "w") as err:  # a file, not a pipe: a full pipe would stall the child
        p = subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=err, preexec_fn=_foreground_signals)
    return p, ready


def test_signals_clean_up_and_keep_losa_state(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    """SIGINT, SIGTERM, SIGHUP: partial output removed, one `interrupted` line, exit 128 + signal (130 for SIGINT),
    LoSA state kept for --resume. SIGKILL: the partial folder stays; the next run there (a --resume) removes it."""
    from losa_deploy.compress.losa.state import STATE_FILE

    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    mag = ["--model", str(tiny_dir), "--method", "magnitude", "--sparsity", "0.5"]
    losa = ["--model", str(tiny_dir), *_losa_args(tiny_dir, text_file)]
    cases = {  # name: (signal, pause point, args); the children run side by side
        "int": (signal.SIGINT, "checkpoint", mag),
        "term": (signal.SIGTERM, "checkpoint", mag),
        "hup": (signal.SIGHUP, "checkpoint", mag),
        "kill": (signal.SIGKILL, "checkpoint", mag),
        "losa": (signal.SIGTERM, "state", losa),
    }
    procs = {n: _start(tmp_path, n, [*a, "--out", str(runs_dir / n)], at) for n, (_, at, a) in cases.items()}
    try:
        deadline = time.time() + 300
        for name, (p, ready) in procs.items():
            while not ready.exists():
                assert p.poll() is None, (name, (tmp_path / f"{name}.err").read_text())
                assert time.time() < deadline, name
                time.sleep(0.2)
            time.sleep(0.3)  # inside time.sleep now
            p.send_signal(cases[name][0])
        results = {n: (p.wait(timeout=120), (tmp_path / f"{n}.err").read_text()) for n, (p, _) in procs.items()}
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
    for name, (sig, at, _) in cases.items():
        code, err = results[name]
        partials = list(runs_dir.glob(f".{name}.partial-*"))
        assert not (runs_dir / name).exists(), name
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL and len(partials) == 1, (name, code)
            continue
        assert code == (130 if sig == signal.SIGINT else 128 + sig), (name, code, err)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert lines[-1].startswith(f"interrupted ({sig.name})"), (name, err)
        assert "Traceback" not in err and not partials, name
    assert "partial output removed" in results["term"][1] and "rerun with --resume" in results["losa"][1]
    state = runs_dir / ".losa.losa-work" / STATE_FILE
    assert state.is_file() and (state.stat().st_mode & 0o777) == 0o644  # kept, with the usual mode

    # the next run that writes beside a killed run's leftover removes it, with a note (here a --resume, which
    # continues the SIGTERM-ed LoSA run from its first finished step)
    killed = next(runs_dir.glob(".kill.partial-*"))
    stale = killed.rename(runs_dir / killed.name.replace(".kill.", ".losa."))
    code, o, e = _main(monkeypatch, capsys, "compress", *losa, "--out", str(runs_dir / "losa"), "--resume", "--json")
    assert code == 0, e
    assert json.loads(o)["losa"]["resumed_from_step"] == 1
    assert f"note: removed {stale.name}, left by an interrupted run" in e and not stale.exists()
    assert not (runs_dir / ".losa.losa-work").exists() and (runs_dir / "losa" / "losa_manifest.json").is_file()


def test_an_ignored_signal_stays_ignored():
    """`nohup losa-deploy ...` (SIGHUP ignored by the parent) keeps running when the terminal closes."""
    from losa_deploy.errors import install_signal_handlers, raise_interrupted, restore_signal_handlers

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        previous = install_signal_handlers()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.SIGHUP not in previous
        assert signal.getsignal(signal.SIGTERM) is raise_interrupted
        restore_signal_handlers(previous)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_live_runs_partial_folder_is_not_removed(tmp_path):
    from losa_deploy.artifact import partial_prefix, stale_partials

    final = tmp_path / "out"
    live = tmp_path / f"{partial_prefix(final)}1-abc"  # pid 1 is alive
    dead = tmp_path / f"{partial_prefix(final)}{2**22 + 7}-abc"  # above pid_max: no such process
    old = tmp_path / f"{partial_prefix(final)}xyz"  # a name from before pids were recorded
    for d in (live, dead, old):
        d.mkdir()
    assert stale_partials(final) == sorted([dead, old])


# ---- environment faults -----------------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A tiny tmpfs (mounting needs privileges; None where it is not allowed, and the tests use a stand-in)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    mounted = []

    def make(size: str, read_only: bool = False) -> Path | None:
        opts = f"size={size}" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            return None
        mounted.append(mnt)
        return mnt

    yield make
    for m in mounted:
        subprocess.run(["umount", str(m)], capture_output=True)


def _refuse_load(monkeypatch):
    import losa_deploy.models as models

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the environment check")

    monkeypatch.setattr(models, "load_model", boom)


def _fail_probe(monkeypatch, code: int) -> None:
    import tempfile

    def mkstemp(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_read_only_out_refused_before_loading(tiny_dir, small_fs, monkeypatch, capsys):
    fs = small_fs("1m", read_only=True)
    if fs is None:  # stand-in: the probe write fails the way a read-only mount makes it fail
        fs = Path(tiny_dir).parent
        _fail_probe(monkeypatch, errno.EROFS)
    _refuse_load(monkeypatch)
    code, o, e = _main(monkeypatch, capsys, "compress", "--model", str(tiny_dir), "--method", "magnitude",
                       "--out", str(fs / "sub" / "out"))
    assert code == 2 and "read-only file system" in _one_error_line(e)
    assert not (fs / "sub").exists()


def test_permission_denied_and_missing_parent(tiny_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    code, o, e = _main(monkeypatch, capsys, "compress", "--model", str(tiny_dir), "--method", "magnitude",
                       "--out", str(tmp_path / "afile" / "out"))
    assert code == 2 and "is a file, not a directory" in _one_error_line(e)
    # root ignores permission bits, so a refused write is stood in for
    with monkeypatch.context() as m:
        _fail_probe(m, errno.EACCES)
        code, o, e = _main(m, capsys, "export", str(tiny_dir), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == 2 and "permission denied" in _one_error_line(e)
    # faults after the checks (a directory removed mid-run, permissions changed): still one line, exit 2
    import losa_deploy.artifact as artifact

    for exc, words in ((FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"), "no such file"),
                       (PermissionError(errno.EACCES, "Permission denied", "/x/y"), "permission denied")):
        def fail(*a, exc=exc, **k):
            raise exc

        with monkeypatch.context() as m:
            m.setattr(artifact, "save_checkpoint", fail)
            code, o, e = _main(m, capsys, "compress", "--model", str(tiny_dir), "--method", "magnitude",
                               "--out", str(tmp_path / "o"))
        line = _one_error_line(e)
        assert code == 2 and words in line and "'/x/y'" in line
        assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))


def test_no_space_left(tiny_dir, small_fs, tmp_path, monkeypatch, capsys):
    fs = small_fs("4m")
    if fs is not None:  # the estimate (weights + masks + 16 MiB slack) does not fit: refused before loading
        with monkeypatch.context() as m:
            _refuse_load(m)
            code, o, e = _main(m, capsys, "compress", "--model", str(tiny_dir), "--method", "magnitude",
                               "--out", str(fs / "out"))
        assert code == 2 and "MiB needed but only" in _one_error_line(e)
    # the estimate passes, the disk fills while safetensors writes: the same one-line error, nothing left behind
    from safetensors import SafetensorError

    import losa_deploy.artifact as artifact

    monkeypatch.setattr(artifact.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**40, 0, 2**40))
    target = fs or tmp_path
    if fs is not None:
        (fs / "filler").write_bytes(b"\0" * (4 * 2**20 - 300 * 2**10))  # leave ~300 KiB: less than the weights
    else:
        import transformers.modeling_utils as mu

        def full(*a, **k):
            raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

        monkeypatch.setattr(mu, "safe_save_file", full)
    code, o, e = _main(monkeypatch, capsys, "compress", "--model", str(tiny_dir), "--method", "magnitude",
                       "--out", str(target / "full"))
    assert code == 2 and "no space left on device" in _one_error_line(e)
    assert not (target / "full").exists() and not list(target.glob(".full.partial-*"))


def test_environment_error_mapping():
    from safetensors import SafetensorError

    from losa_deploy.errors import environment_error

    assert "read-only file system: '/m/x'" in str(environment_error(OSError(errno.EROFS, "Read-only", "/m/x")))
    full = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    assert "no space left" in str(environment_error(SafetensorError(full)))
    assert environment_error(ValueError("a bug")) is None
    assert environment_error(OSError(errno.EINVAL, "Invalid argument")) is None


def test_truncated_weights_same_error_everywhere(sparse_dir, text_file, tmp_path, monkeypatch, capsys):
    cut = _copy(sparse_dir, tmp_path / "cut")
    f = cut / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    for args in (["export", str(cut), "--format", "hf", "--out", str(tmp_path / "a")],
                 ["export", str(cut), "--format", "onnx", "--out", str(tmp_path / "b")],
                 ["evaluate", str(cut), "--data", str(text_file), "--seqlen", "32", "--max-tokens", "64"],
                 ["compress", "--model", str(cut), "--method", "magnitude", "--out", str(tmp_path / "c")]):
        code, o, e = _main(monkeypatch, capsys, *args)
        line = _one_error_line(e)
        assert code == 2 and f"could not load model '{cut}' (corrupt or incomplete checkpoint?)" in line, (args, line)


# ---- bench's inputs and output folder ---------------------------------------------------------------------------

def test_bench_checks_inputs_first_and_owns_its_out(sparse_dir, tmp_path, monkeypatch, capsys):
    import losa_deploy.bench.run as B

    dense = str(sparse_dir.parent / "dense")
    bad = tmp_path / "piqa.jsonl"
    bad.write_text('{"goal": "x", "sol1": "a", "sol2": "b"}\nnot json\n')
    (tmp_path / "piqa-labels.lst").write_text("0\n1\n")
    with monkeypatch.context() as m:
        _refuse_load(m)
        m.setattr(B, "select_runtimes", lambda *a: pytest.fail("runtimes probed before the task file was read"))
        code, o, e = _main(m, capsys, "bench", str(sparse_dir), "--baseline", dense, "--out", str(tmp_path / "r"),
                           "--task-data", f"piqa={bad}")
    assert code == 2 and "piqa" in _one_error_line(e) and "line 2" in e
    assert not (tmp_path / "r").exists()

    mine, new = tmp_path / "mine", tmp_path / "new"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    code, o, e = _main(monkeypatch, capsys, "bench", str(sparse_dir), "--baseline", dense, "--out", str(mine),
                       "--skip-latency", "--skip-accuracy")
    assert code == 2 and "--overwrite" in _one_error_line(e) and (tmp_path / "mine" / "keep.txt").read_text() == "mine"
    code, o, e = _main(monkeypatch, capsys, "bench", str(sparse_dir), "--baseline", dense, "--out", str(mine),
                       "--skip-latency", "--skip-accuracy", "--overwrite")
    assert code == 0, e
    assert (tmp_path / "mine" / "report.json").is_file() and (tmp_path / "mine" / "keep.txt").is_file()

    import losa_deploy.bench.report as R

    def crash(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(R, "write_report", crash)
    code, o, e = _main(monkeypatch, capsys, "bench", str(sparse_dir), "--baseline", dense, "--out", str(new),
                       "--skip-latency", "--skip-accuracy")
    assert code == 1 and not (tmp_path / "new").exists()  # a failure leaves no (empty) folder


# ---- file modes -------------------------------------------------------------------------------------------------

def test_files_get_the_usual_mode(sparse_dir, tmp_path, monkeypatch, capsys):
    from losa_deploy.atomic import write_json

    for f in sparse_dir.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f
    code, o, e = _main(monkeypatch, capsys, "export", str(sparse_dir), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == 0, e
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755
    for f in (tmp_path / "hf").iterdir():
        # the compressed-tensors weights (written by safetensors as 0600) included
        assert f.stat().st_mode & 0o777 == 0o644, f
    old = os.umask(0o027)
    try:
        assert write_json(tmp_path / "u.json", {}).stat().st_mode & 0o777 == 0o640  # the umask is respected
    finally:
        os.umask(old)


# ---- names in messages ------------------------------------------------------------------------------------------

def test_messages_use_the_names_users_write(tmp_path, monkeypatch, capsys):
    from losa_deploy.errors import UserError
    from losa_deploy.compress import Recipe

    with pytest.raises(UserError) as ei:
        Recipe.from_settings({"rank_strat": 3})
    msg = str(ei.value)
    assert "did you mean 'rank_start'" in msg and "rank_start" in msg and "dropout" in msg
    assert "losa_rank_min" not in msg and "losa_dropout" not in msg and "losa_" not in msg
    assert Recipe.from_settings({"lora_dropout": 0.0, "dropout": 0.0}).adapters.lora_dropout == 0.0
    with pytest.raises(UserError, match="--lora-dropout must be in"):
        Recipe.of(out="x", method="losa", lora_dropout=1.5).validate()
    with pytest.raises(UserError, match="unknown --lr-schedule 'cosine'"):
        Recipe.from_settings({"out": str(tmp_path / "o2"), "method": "losa", "lr_schedule": "cosine"}).validate()
    with pytest.raises(UserError, match="--train-share-power must lie in"):
        Recipe.of(out="x", method="losa", train_share_power=-1.0).validate()
    prof = tmp_path / "p.toml"
    prof.write_text("[compress]\nmethod = \"losa\"\nrank_min = 3\n")
    code, o, e = _main(monkeypatch, capsys, "compress", "--profile", str(prof), "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown compress setting 'rank_min'" in _one_error_line(e) and "losa_" not in e
