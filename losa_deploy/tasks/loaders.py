"""Readers for the original file formats of the zero-shot benchmarks, normalised to the harness's dataset schemas.

Each loader turns a user's file into the rows the lm-evaluation-harness task expects from its Hugging Face dataset
(e.g. PIQA `{goal, sol1, sol2, label}`), so the shipped YAMLs can keep the harness's own prompts and targets verbatim.
Every malformed input raises UserError with one line saying what is wrong and where.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError

Row = dict[str, Any]


def _path(path: str | Path, task: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{task}: file '{p}' does not exist; pass --task-data {task}=PATH to an existing file")
    if not p.is_file():
        raise UserError(f"{task}: '{p}' is not a file; pass the data file itself (--task-data {task}=FILE)")
    return p


def _read_text(p: Path, task: str) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{task}: '{p}' is not UTF-8 text; pass the original {task} data file") from None
    except OSError as e:
        raise UserError(f"{task}: cannot read '{p}': {e.strerror or e}") from None


def _jsonl(p: Path, task: str, limit: int | None) -> list[tuple[int, dict]]:
    """Non-empty lines of a JSONL file as (line number, object); a .json file holding a list is accepted too."""
    text = _read_text(p, task)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{task}: '{p}' is not valid JSON ({e.msg} at line {e.lineno})") from None
        out = [(i + 1, d) for i, d in enumerate(data)]
    else:
        out = []
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{task}: '{p}' line {no} is not valid JSON ({e.msg}); expected one JSON object per line"
                ) from None
            if limit is not None and len(out) >= limit:
                break
    for no, d in out:
        if not isinstance(d, dict):
            raise UserError(f"{task}: '{p}' line {no} is not a JSON object")
    if limit is not None:
        out = out[:limit]
    if not out:
        raise UserError(f"{task}: '{p}' has no items")
    return out


def _need(d: dict, keys: tuple[str, ...], p: Path, no: int, task: str, fmt: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise UserError(f"{task}: '{p}' line {no} lacks {', '.join(missing)}; expected {fmt}")


def _str(v: Any, p: Path, no: int, task: str, key: str) -> str:
    if not isinstance(v, str):
        raise UserError(f"{task}: '{p}' line {no}: '{key}' must be a string")
    return v


def piqa_labels_path(p: Path) -> Path:
    """`valid.jsonl` -> `valid-labels.lst` (the layout of the original PIQA release)."""
    return p.with_name(p.name[: -len(p.suffix)] + "-labels.lst" if p.suffix else p.name + "-labels.lst")


def load_piqa(path: str | Path, limit: int | None = None) -> list[Row]:
    """PIQA: `{goal, sol1, sol2}` JSONL plus the labels file `<stem>-labels.lst` beside it (one 0/1 per line)."""
    task = "piqa"
    p = _path(path, task)
    rows = _jsonl(p, task, limit)
    lp = piqa_labels_path(p)
    if not lp.is_file():
        raise UserError(f"piqa: labels file '{lp}' not found; PIQA answers live beside the data as <stem>-labels.lst")
    labels = [ln.strip() for ln in _read_text(lp, task).splitlines() if ln.strip()]
    if len(labels) < len(rows):
        raise UserError(f"piqa: '{lp}' has {len(labels)} labels but '{p}' has at least {len(rows)} items")
    out = []
    for (no, d), lab in zip(rows, labels):
        _need(d, ("goal", "sol1", "sol2"), p, no, task, "JSONL {goal, sol1, sol2}")
        if lab not in ("0", "1"):
            raise UserError(f"piqa: '{lp}' has label '{lab}' for item {no}; expected 0 or 1")
        out.append({"goal": _str(d["goal"], p, no, task, "goal"), "sol1": _str(d["sol1"], p, no, task, "sol1"),
                    "sol2": _str(d["sol2"], p, no, task, "sol2"), "label": int(lab)})
    return out


def _arc_like(path: str | Path, limit: int | None, task: str, stem_key: str) -> list[Row]:
    """ARC / OpenBookQA original JSONL `{id, question: {stem, choices: [{text, label}]}, answerKey}`.

    Also accepts the harness's flattened schema (`question`/`question_stem` string, `choices: {text, label}`).
    """
    p = _path(path, task)
    fmt = 'JSONL {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}'
    out = []
    for no, d in _jsonl(p, task, limit):
        q = d.get("question", d.get(stem_key))
        if q is None or "answerKey" not in d:
            raise UserError(f"{task}: '{p}' line {no} lacks question or answerKey; expected {fmt}")
        if isinstance(q, dict):
            if "stem" not in q or not isinstance(q.get("choices"), list):
                raise UserError(f"{task}: '{p}' line {no}: 'question' lacks stem/choices; expected {fmt}")
            stem, chs = q["stem"], q["choices"]
            try:
                texts = [str(c["text"]) for c in chs]
                labels = [str(c["label"]) for c in chs]
            except (KeyError, TypeError):
                raise UserError(f"{task}: '{p}' line {no}: each choice needs 'text' and 'label'") from None
        elif isinstance(q, str) and isinstance(d.get("choices"), dict):
            stem = q
            texts = [str(t) for t in d["choices"].get("text", [])]
            labels = [str(t) for t in d["choices"].get("label", [])]
        else:
            raise UserError(f"{task}: '{p}' line {no} has an unexpected 'question'; expected {fmt}")
        key = str(d["answerKey"]).strip()
        if len(texts) < 2 or len(texts) != len(labels):
            raise UserError(f"{task}: '{p}' line {no} needs at least two choices, each with a label")
        if key not in labels:
            raise UserError(f"{task}: '{p}' line {no}: answerKey '{key}' is not one of the choice labels {labels}")
        out.append({"id": str(d.get("id", no)), stem_key: _str(stem, p, no, task, "stem"),
                    "choices": {"text": texts, "label": labels}, "answerKey": key})
    return out


def load_arc(path: str | Path, limit: int | None = None, task: str = "arc_easy") -> list[Row]:
    return _arc_like(path, limit, task, "question")


def load_openbookqa(path: str | Path, limit: int | None = None) -> list[Row]:
    return _arc_like(path, limit, "openbookqa", "question_stem")


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def load_boolq(path: str | Path, limit: int | None = None) -> list[Row]:
    """BoolQ SuperGLUE JSONL `{question, passage, idx, label}` (label true/false; original `answer` also accepted)."""
    task = "boolq"
    p = _path(path, task)
    out = []
    for no, d in _jsonl(p, task, limit):
        _need(d, ("question", "passage"), p, no, task, "JSONL {question, passage, idx, label}")
        lab = d.get("label", d.get("answer"))
        s = str(lab).strip().lower()
        if s not in _TRUE | _FALSE:
            raise UserError(
                f"boolq: '{p}' line {no}: label '{lab}' is not true/false (unlabelled test files cannot be scored)"
            )
        out.append(
            {
                "question": _str(d["question"], p, no, task, "question"),
                "passage": _str(d["passage"], p, no, task, "passage"),
                "idx": d.get("idx", no - 1),
                "label": 1 if s in _TRUE else 0,
            }
        )
    return out


_SENT_END = re.compile(r"[.!?]\s")


def split_hellaswag_context(line: str) -> tuple[str, str, str]:
    """A context line `activity_label: ctx_a ctx_b` back to (activity_label, ctx_a, ctx_b).

    The harness capitalises ctx_b (`ctx_a + " " + ctx_b.capitalize()`), so the split matters. In HellaSwag, ctx_b is
    the unfinished lowercase sentence after ctx_a's last full stop (ActivityNet items: "... on a roof. he") and is
    empty when the context ends with a full sentence (WikiHow items). We recover exactly that: the text after the last
    sentence end, if it does not itself end a sentence.
    """
    label, sep, ctx = line.partition(": ")
    if not sep:
        label, ctx = "", line
    ctx = ctx.strip()
    ends = list(_SENT_END.finditer(ctx))
    tail = ctx[ends[-1].end():] if ends else ""
    if tail and not tail.rstrip().endswith((".", "!", "?")):
        return label, ctx[: ends[-1].end()].rstrip(), tail
    return label, ctx, ""


def load_hellaswag(path: str | Path, limit: int | None = None) -> list[Row]:
    """HellaSwag as 6-line text items (context line, gold index 0-3, four endings), e.g. hellaswag_val_full.txt.

    The original HellaSwag JSONL (`{activity_label, ctx_a, ctx_b, endings, label}`) is accepted too.
    """
    task = "hellaswag"
    p = _path(path, task)
    text = _read_text(p, task)
    if text.lstrip().startswith("{"):
        out = []
        for no, d in _jsonl(p, task, limit):
            _need(d, ("activity_label", "ctx_a", "ctx_b", "endings", "label"), p, no, task, "HellaSwag JSONL")
            if not isinstance(d["endings"], list) or str(d["label"]).strip() not in {
                str(i) for i in range(len(d["endings"]))
            }:
                raise UserError(f"hellaswag: '{p}' line {no}: label must index 'endings'")
            out.append(
                {k: d[k] for k in ("activity_label", "ctx_a", "ctx_b", "endings")} | {"label": str(d["label"]).strip()}
            )
        return out
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise UserError(
            f"hellaswag: '{p}' has {len(lines)} lines, not a multiple of 6; expected per item a context line, "
            "the gold index (0-3) and four ending lines"
        )
    out = []
    for i in range(0, len(lines), 6):
        if limit is not None and len(out) >= limit:
            break
        ctx, gold, *endings = (ln.rstrip("\r") for ln in lines[i : i + 6])
        if gold.strip() not in {"0", "1", "2", "3"}:
            raise UserError(f"hellaswag: '{p}' line {i + 2}: '{gold.strip()[:20]}' is not a gold index 0-3; "
                            "expected 6-line items (context, gold index, four endings)")
        label, ctx_a, ctx_b = split_hellaswag_context(ctx)
        out.append({"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings, "label": gold.strip()})
    return out


def load_winogrande(path: str | Path, limit: int | None = None) -> list[Row]:
    """WinoGrande JSONL `{sentence, option1, option2, answer}` with `_` as the blank and answer "1"/"2"."""
    task = "winogrande"
    p = _path(path, task)
    out = []
    for no, d in _jsonl(p, task, limit):
        _need(
            d, ("sentence", "option1", "option2", "answer"), p, no, task, "JSONL {sentence, option1, option2, answer}"
        )
        s = _str(d["sentence"], p, no, task, "sentence")
        if s.count("_") < 1:
            raise UserError(f"winogrande: '{p}' line {no}: the sentence has no '_' blank")
        ans = str(d["answer"]).strip()
        if ans not in ("1", "2"):
            raise UserError(
                f"winogrande: '{p}' line {no}: answer '{d['answer']}' is not 1 or 2 "
                "(unlabelled test files cannot be scored)"
            )
        out.append({"sentence": s, "option1": str(d["option1"]), "option2": str(d["option2"]), "answer": ans})
    return out


_RTE = {"entailment": 0, "not_entailment": 1, "0": 0, "1": 1}


def load_rte(path: str | Path, limit: int | None = None) -> list[Row]:
    """RTE as the GLUE TSV (header with sentence1, sentence2, label; label entailment/not_entailment or 0/1).

    SuperGLUE's JSONL (`premise, hypothesis, label`) is accepted too. Label 0 = entailment, scored as "True".
    """
    task = "rte"
    p = _path(path, task)
    text = _read_text(p, task)
    out = []
    if p.suffix.lower() in (".jsonl", ".json"):
        for no, d in _jsonl(p, task, limit):
            s1, s2 = d.get("sentence1", d.get("premise")), d.get("sentence2", d.get("hypothesis"))
            if s1 is None or s2 is None or "label" not in d:
                raise UserError(f"rte: '{p}' line {no} lacks sentence1/premise, sentence2/hypothesis or label")
            lab = _RTE.get(str(d["label"]).strip().lower())
            if lab is None:
                raise UserError(f"rte: '{p}' line {no}: label '{d['label']}' is not entailment/not_entailment/0/1")
            out.append({"sentence1": str(s1), "sentence2": str(s2), "label": lab})
    else:
        lines = text.splitlines()
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if not header or not {"sentence1", "sentence2", "label"} <= {h.strip() for h in header}:
            raise UserError(
                f"rte: '{p}' needs a tab-separated header with sentence1, sentence2 and label (GLUE RTE TSV)"
            )
        col = {h.strip(): i for i, h in enumerate(header)}
        for no, rec in enumerate(reader, 2):
            if not any(x.strip() for x in rec):
                continue
            if limit is not None and len(out) >= limit:
                break
            if len(rec) < len(header):
                raise UserError(
                    f"rte: '{p}' line {no} has {len(rec)} tab-separated fields, the header has {len(header)}"
                )
            lab = _RTE.get(rec[col["label"]].strip().lower())
            if lab is None:
                raise UserError(
                    f"rte: '{p}' line {no}: label '{rec[col['label']]}' is not entailment/not_entailment/0/1 "
                    "(unlabelled test files cannot be scored)"
                )
            out.append({"sentence1": rec[col["sentence1"]], "sentence2": rec[col["sentence2"]], "label": lab})
        if not out:
            raise UserError(f"rte: '{p}' has no items")
    return out


# name -> (loader, shipped YAML task name)
LOCAL_TASKS: dict[str, tuple[Callable[..., list[Row]], str]] = {
    "piqa": (load_piqa, "local_piqa"),
    "arc_easy": (lambda p, limit=None: load_arc(p, limit, "arc_easy"), "local_arc_easy"),
    "arc_challenge": (lambda p, limit=None: load_arc(p, limit, "arc_challenge"), "local_arc_challenge"),
    "boolq": (load_boolq, "local_boolq"),
    "hellaswag": (load_hellaswag, "local_hellaswag"),
    "winogrande": (load_winogrande, "local_winogrande"),
    "openbookqa": (load_openbookqa, "local_openbookqa"),
    "rte": (load_rte, "local_rte"),
}
