"""Zero-shot accuracy through lm-evaluation-harness, on local copies of the benchmarks or on any harness task.

Scoring is the harness's own (METHODS §5): log-likelihood of each choice after the prompt, `acc` = argmax of the
summed log-likelihood, `acc_norm` = argmax of log-likelihood per character of the choice. We never re-implement that:
local files are converted to the schema of the harness's dataset (tasks/loaders.py) and evaluated with YAMLs
(losa_deploy/tasks/*.yaml) that copy the harness's prompts, choices and targets. Those local tasks are named
`local_<task>` inside the harness so they never clash with its own, and are reported under the user's name (`piqa`,
`arc_easy`, ...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError
from ..tasks import TASKS_DIR
from ..tasks.loaders import LOCAL_TASKS

LOCAL_TASK_NAMES = tuple(LOCAL_TASKS)


def parse_task_args(tasks: str | None, task_data: list[str] | None) -> dict[str, str | None]:
    """`--tasks a,b` and repeated `--task-data NAME=PATH` -> {name: path or None}.

    A name given only in --tasks is a harness task (needs its dataset online); a name with --task-data is read locally.
    """
    out: dict[str, str | None] = {}
    for item in task_data or []:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UserError(f"--task-data '{item}' must be NAME=PATH, e.g. --task-data piqa=data/piqa/valid.jsonl")
        if name not in LOCAL_TASKS:
            raise UserError(f"--task-data: no local reader for '{name}'; local tasks are {', '.join(LOCAL_TASK_NAMES)}")
        if name in out:
            raise UserError(f"--task-data {name} given twice")
        out[name] = path
    for name in (tasks or "").split(","):
        name = name.strip()
        if name and name not in out:
            out[name] = None
    return out


def _write_local_task(tmp: Path, name: str, path: str, limit: int | None) -> str:
    """Convert the user's file to JSONL in the harness schema and write a YAML pointing the shipped config at it."""
    loader, task_name = LOCAL_TASKS[name]
    rows = loader(path, limit)
    data = tmp / "data" / f"{task_name}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    with open(data, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    cfg = {
        "include": str(TASKS_DIR / f"{task_name}.yaml"),
        "task": task_name,
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp / "hf_cache")},
    }
    (tmp / "tasks").mkdir(exist_ok=True)
    # JSON is valid YAML and quotes any path safely.
    (tmp / "tasks" / f"{task_name}.yaml").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return task_name


class _RichTqdm:
    """The subset of tqdm the harness's HFLM uses (total, update, close), drawn as a Rich bar on stderr."""

    enabled = True

    def __init__(
        self, iterable: Any = None, total: int | None = None, desc: str | None = None, disable: bool = False, **_: Any
    ):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from ..console import err
        from ..progress import make_progress

        self.iterable = iterable
        self._prog = None
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        if not disable and self.enabled:
            label = _RichTqdm.label or (desc or "")
            self._prog = make_progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                       TimeRemainingColumn(), console=err, transient=True)
            self._prog.start()
            self._task = self._prog.add_task(label, total=total)

    label: str = ""

    def update(self, n: int = 1) -> None:
        if self._prog is not None:
            self._prog.update(self._task, advance=n)

    def close(self) -> None:
        if self._prog is not None:
            self._prog.stop()
            self._prog = None

    def __iter__(self) -> Iterator[Any]:
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "_RichTqdm":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_description(self, *_: Any, **__: Any) -> None:  # tqdm API used by some harness paths
        pass


def _quiet_tqdm(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
    return iterable if iterable is not None else _RichTqdm(disable=True)


@contextlib.contextmanager
def _harness_io(progress: bool, label: str) -> Iterator[None]:
    """Route the harness's per-request progress to one Rich bar; silence its per-document bars and info logs."""
    import lm_eval.api.task as task_mod
    import lm_eval.models.huggingface as hf_mod

    saved = (hf_mod.tqdm, task_mod.tqdm)
    _RichTqdm.enabled, _RichTqdm.label = progress, label
    hf_mod.tqdm, task_mod.tqdm = _RichTqdm, _quiet_tqdm
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_mod.tqdm, task_mod.tqdm = saved
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


@contextlib.contextmanager
def _datasets_offline(offline: bool) -> Iterator[None]:
    """Local files only: tell `datasets` not to reach for the Hub (its flag is read at import, so set it directly)."""
    import datasets.config as dcfg
    from datasets.utils import logging as dlog

    saved = (dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE, dlog.is_progress_bar_enabled())
    if offline:
        dcfg.HF_HUB_OFFLINE = dcfg.HF_DATASETS_OFFLINE = True
    dlog.disable_progress_bar()  # "Generating test split" bars for a few-KB temp file are noise
    try:
        yield
    finally:
        dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE = saved[0], saved[1]
        if saved[2]:
            dlog.enable_progress_bar()


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _set_zero_shot(task_dict: dict) -> None:
    """num_fewshot 0 on every leaf task (groups nest dicts), as simple_evaluate(num_fewshot=0) does."""
    for obj in task_dict.values():
        if isinstance(obj, dict):
            _set_zero_shot(obj)
        else:
            obj.set_config(key="num_fewshot", value=0)
            obj.set_fewshot_seed(seed=1234)


def _run_harness(lm: Any, tm: Any, names: list[str], limit: int | None) -> dict:
    """simple_evaluate's steps, minus its task pretty-printer (0.4.9.2 crashes on any task outside its own folder).

    Same seeds as simple_evaluate (0 / 1234 / 1234), restored afterwards so the caller's RNG streams are untouched.
    """
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    try:
        random.seed(0)
        np.random.seed(1234)
        torch.manual_seed(1234)
        task_dict = tm.load_task_or_group(names)
        _set_zero_shot(task_dict)
        # acc is a mean: its stderr is closed-form and no bootstrap happens; 1000 bounds any other metric's cost.
        return evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=1000, log_samples=False)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def evaluate_zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: dict[str, str | None],
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot accuracy per task, as lm-evaluation-harness scores it (num_fewshot 0).

    tasks: {name: local file path, or None for the harness's own task (its dataset must be reachable online)}.
    limit: the first N items per task. Returns {"tasks": {name: {"acc", "acc_stderr", "acc_norm"?, "acc_norm_stderr"?,
    "n", "source"}}, "average": {"acc": mean over tasks, "acc_norm": mean over tasks that have it}, "limit",
    "num_fewshot", "batch_size", "harness"}.
    """
    if not tasks:
        raise UserError("no zero-shot tasks given; pass --task-data NAME=PATH or --tasks NAME")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1 (got {limit})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {batch_size})")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    online = [n for n, p in tasks.items() if p is None]
    with tempfile.TemporaryDirectory(prefix="losa-zeroshot-") as tmpname:
        tmp = Path(tmpname)
        harness_name: dict[str, str] = {}  # user name -> harness task name
        for name, path in tasks.items():
            harness_name[name] = name if path is None else _write_local_task(tmp, name, path, limit)
        include = str(tmp / "tasks") if (tmp / "tasks").is_dir() else None
        # Without harness tasks there is no need to index the harness's ~thousands of YAMLs (seconds) at all.
        with _harness_io(False, ""):
            tm = TaskManager(include_path=include, include_defaults=bool(online))
        unknown = [n for n in online if n not in tm.all_tasks]
        if unknown:
            local_hint = ", ".join(LOCAL_TASK_NAMES)
            raise UserError(f"unknown task '{unknown[0]}': not a harness task; for local files use "
                            f"--task-data NAME=PATH with NAME one of {local_hint}")
        grouped = [n for n in online if tm.task_index[n].get("type") not in ("task", "python_task")]
        if grouped:
            raise UserError(
                f"'{grouped[0]}' is a harness group or tag, not one task; list its tasks one by one in --tasks"
            )
        try:
            with _harness_io(progress, "zero-shot " + ",".join(tasks)), _datasets_offline(not online):
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
                res = _run_harness(lm, tm, list(harness_name.values()), limit)
        except UserError:
            raise
        except (FileNotFoundError, ConnectionError, OSError) as e:
            if online:
                raise UserError(
                    f"could not load harness task data for {', '.join(online)} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); offline, use local files with --task-data NAME=PATH"
                ) from None
            raise
    if res is None:  # the harness returns None on non-zero ranks only
        raise RuntimeError("lm-evaluation-harness returned no results")
    results, nsamp = res.get("results", {}), res.get("n-samples", {})
    out: dict[str, Any] = {}
    for name, hname in harness_name.items():
        r = results.get(hname)
        if r is None:
            raise RuntimeError(f"lm-evaluation-harness returned no result for task {hname}")
        row: dict[str, Any] = {}
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            if f"{key},none" in r:
                row[key] = _num(r[f"{key},none"])  # a stderr the harness could not compute ("N/A") becomes None
        if row.get("acc") is None:
            raise UserError(f"task '{name}' reports no 'acc' metric (got {sorted(k.split(',')[0] for k in r)}); "
                            "only multiple-choice tasks are supported")
        n = nsamp.get(hname, {}).get("effective")
        row["n"] = int(n) if n is not None else None
        row["source"] = "harness" if tasks[name] is None else str(Path(tasks[name]).expanduser())
        out[name] = row
    avg = {"acc": sum(r["acc"] for r in out.values()) / len(out)}
    with_norm = [r["acc_norm"] for r in out.values() if r.get("acc_norm") is not None]
    if with_norm:
        avg["acc_norm"] = sum(with_norm) / len(with_norm)
        avg["acc_norm_tasks"] = len(with_norm)
    return {
        "tasks": out,
        "average": avg,
        "limit": limit,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "harness": f"lm-evaluation-harness {getattr(lm_eval, '__version__', '?')}",
    }
