"""Zero-shot evaluation: the readers of each original file format, the shipped harness configs on hand-checked rows,
an end-to-end harness run on the tiny model checked against an independent log-likelihood computation, and one
real-model run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from losa_deploy.errors import UserError
from losa_deploy.tasks import loaders as L

# ---------------------------------------------------------------------------------------------- tiny sample files

PIQA = [
    {"goal": "How do I ready a guinea pig cage?", "sol1": "Add paper bedding.", "sol2": "Add jeans bedding."},
    {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin "},
    {"goal": "To boil water", "sol1": "heat it in a pot", "sol2": "put it in the freezer"},
    {"goal": "To cut paper", "sol1": "use scissors", "sol2": "use a spoon"},
]
PIQA_LABELS = "0\n1\n0\n0\n"

ARC = [
    {"id": "a1", "question": {"stem": "Which is a gas?",
                              "choices": [{"text": "ice", "label": "A"}, {"text": "steam", "label": "B"},
                                          {"text": "rock", "label": "C"}]}, "answerKey": "B"},
    {"id": "a2", "question": {"stem": "2+2?", "choices": [{"text": "3", "label": "1"}, {"text": "4", "label": "2"},
                                                          {"text": "5", "label": "3"}, {"text": "22", "label": "4"}]},
     "answerKey": "2"},
]

BOOLQ = [
    {"question": "is the sky blue", "passage": "Sky -- The sky looks blue on clear days.", "idx": 0, "label": True},
    {"question": "is ice hot", "passage": "Ice -- Ice is frozen water.", "idx": 1, "label": False},
    {"question": "do cats bark", "passage": "Cat -- Cats meow.", "idx": 2, "label": 0},
]

HELLASWAG = """Roof shingle removal: A man is sitting on a roof. he
3
is using wrap to wrap a pair of skis.
is ripping level tiles off.
is holding a rubik's cube.
starts pulling up roofing on a roof.
Health: How to use aromatherapy for depression. Know what oils help with which symptoms. Basil works against fatigue.
0
Lavender is calming.
Eat a [title] sandwich.
Go skiing.
Buy a car.
Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady
3
swings and lands in her arms.
pulls the barbell forward.
pulls a rope attached to the barbell.
stands and lifts the weight over her head.
High jump: A boy is running down a track. the boy
2
runs into a car.
gets in a mat.
lifts his body above the height of a pole.
stands on his hands and springs.
"""

WINOGRANDE = [
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.", "option1": "Sarah",
     "option2": "Maria", "answer": "1"},
    {"sentence": "The trophy doesn't fit into the suitcase because the _ is too small.", "option1": "trophy",
     "option2": "suitcase", "answer": "2"},
]

OBQA = [
    {"id": "7-980", "question": {"stem": "The sun is responsible for",
                                 "choices": [{"text": "puppies learning new tricks", "label": "A"},
                                             {"text": "plants sprouting, blooming and wilting", "label": "B"}]},
     "answerKey": "B"},
]

RTE_TSV = ("index\tsentence1\tsentence2\tlabel\n"
           "0\tDana Reeve, the widow of the actor, died at 44.\tChristopher Reeve had an accident.\tnot_entailment\n"
           "1\tYet, we now are discovering that \"antibiotics\" work.\tBacteria is winning the war.\tentailment\n")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    f = {
        "piqa": _jsonl(tmp_path / "valid.jsonl", PIQA),
        "arc_easy": _jsonl(tmp_path / "ARC-Easy-Test.jsonl", ARC),
        "boolq": _jsonl(tmp_path / "val.jsonl", BOOLQ),
        "winogrande": _jsonl(tmp_path / "wino_dev.jsonl", WINOGRANDE),
        "openbookqa": _jsonl(tmp_path / "obqa.jsonl", OBQA),
    }
    (tmp_path / "valid-labels.lst").write_text(PIQA_LABELS)
    (tmp_path / "hs.txt").write_text(HELLASWAG, encoding="utf-8")
    f["hellaswag"] = tmp_path / "hs.txt"
    (tmp_path / "rte.tsv").write_text(RTE_TSV, encoding="utf-8")
    f["rte"] = tmp_path / "rte.tsv"
    return f


# ---------------------------------------------------------------------------------------------------- loaders


def test_piqa_loader_reads_labels_beside_the_data(files):
    rows = L.load_piqa(files["piqa"])
    assert [r["label"] for r in rows] == [0, 1, 0, 0]
    assert rows[1]["sol2"] == "finish, woodgrain with  bobby pin "  # text kept verbatim
    assert len(L.load_piqa(files["piqa"], limit=2)) == 2


def test_piqa_without_labels_file_is_a_user_error(files):
    (files["piqa"].parent / "valid-labels.lst").unlink()
    with pytest.raises(UserError, match="valid-labels.lst"):
        L.load_piqa(files["piqa"])


def test_piqa_short_labels_file_is_a_user_error(files):
    (files["piqa"].parent / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(UserError, match="2 labels"):
        L.load_piqa(files["piqa"])


def test_arc_loader_flattens_to_harness_schema_with_letter_and_digit_keys(files):
    rows = L.load_arc(files["arc_easy"])
    assert rows[0]["question"] == "Which is a gas?"
    assert rows[0]["choices"] == {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]}
    assert rows[0]["answerKey"] == "B"
    assert rows[1]["choices"]["label"] == ["1", "2", "3", "4"] and rows[1]["answerKey"] == "2"


def test_arc_answer_key_not_among_labels_is_a_user_error(tmp_path):
    bad = dict(ARC[0], answerKey="E")
    with pytest.raises(UserError, match="answerKey 'E'"):
        L.load_arc(_jsonl(tmp_path / "a.jsonl", [bad]))


def test_boolq_loader_maps_true_false_and_ints(files):
    assert [r["label"] for r in L.load_boolq(files["boolq"])] == [1, 0, 0]


def test_hellaswag_context_split_recovers_ctx_b():
    assert L.split_hellaswag_context("Roof shingle removal: A man is sitting on a roof. he") == (
        "Roof shingle removal", "A man is sitting on a roof.", "he")
    assert L.split_hellaswag_context("Clean and jerk: A lady walks. She grabs the pole. the lady") == (
        "Clean and jerk", "A lady walks. She grabs the pole.", "the lady")
    # WikiHow items end with a whole sentence: ctx_b is empty, nothing gets capitalised
    assert L.split_hellaswag_context("Health: How to use oils. Know what oils help. Basil works.") == (
        "Health", "How to use oils. Know what oils help. Basil works.", "")


def test_hellaswag_loader_six_line_items(files):
    rows = L.load_hellaswag(files["hellaswag"])
    assert len(rows) == 4
    assert rows[0]["label"] == "3" and rows[0]["endings"][3] == "starts pulling up roofing on a roof."
    assert rows[0]["ctx_b"] == "he"


def test_hellaswag_bad_line_count_is_a_user_error(tmp_path):
    p = tmp_path / "h.txt"
    p.write_text("\n".join(HELLASWAG.splitlines()[:8]))
    with pytest.raises(UserError, match="multiple of 6"):
        L.load_hellaswag(p)


def test_hellaswag_bad_gold_is_a_user_error(tmp_path):
    p = tmp_path / "h.txt"
    p.write_text(HELLASWAG.replace("\n3\n", "\nx\n", 1))
    with pytest.raises(UserError, match="gold index"):
        L.load_hellaswag(p)


def test_winogrande_loader_and_unlabelled_rows(files, tmp_path):
    assert [r["answer"] for r in L.load_winogrande(files["winogrande"])] == ["1", "2"]
    with pytest.raises(UserError, match="not 1 or 2"):
        L.load_winogrande(_jsonl(tmp_path / "w.jsonl", [dict(WINOGRANDE[0], answer="")]))
    with pytest.raises(UserError, match="blank"):
        L.load_winogrande(_jsonl(tmp_path / "w2.jsonl", [dict(WINOGRANDE[0], sentence="no blank")]))


def test_openbookqa_loader(files):
    (row,) = L.load_openbookqa(files["openbookqa"])
    assert row["question_stem"] == "The sun is responsible for" and row["answerKey"] == "B"


def test_rte_tsv_loader_keeps_quotes_and_maps_labels(files, tmp_path):
    rows = L.load_rte(files["rte"])
    assert [r["label"] for r in rows] == [1, 0]  # not_entailment = 1, entailment = 0 (GLUE)
    assert rows[1]["sentence1"] == 'Yet, we now are discovering that "antibiotics" work.'
    p = tmp_path / "bad.tsv"
    p.write_text("a\tb\n1\t2\n")
    with pytest.raises(UserError, match="sentence1, sentence2 and label"):
        L.load_rte(p)


@pytest.mark.parametrize("name", list(L.LOCAL_TASKS))
def test_every_loader_rejects_missing_and_wrong_files(name, tmp_path):
    loader = L.LOCAL_TASKS[name][0]
    with pytest.raises(UserError, match="does not exist"):
        loader(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="not a file"):
        loader(tmp_path)
    wrong = tmp_path / ("w-x.tsv" if name == "rte" else "w.jsonl")
    wrong.write_text('{"text": "a wikitext line"}\n')
    (tmp_path / "w-labels.lst").write_text("0\n")
    with pytest.raises(UserError):
        loader(wrong)
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError):
        loader(binary)


def test_parse_task_args():
    from losa_deploy.evaluation.zeroshot import parse_task_args

    assert parse_task_args("piqa,arc_easy, mmlu", ["piqa=/x/valid.jsonl"]) == {
        "piqa": "/x/valid.jsonl", "arc_easy": None, "mmlu": None}
    with pytest.raises(UserError, match="NAME=PATH"):
        parse_task_args(None, ["piqa"])
    with pytest.raises(UserError, match="no local reader"):
        parse_task_args(None, ["mmlu=/x"])
    with pytest.raises(UserError, match="twice"):
        parse_task_args(None, ["piqa=/a", "piqa=/b"])


# ------------------------------------------------------------------ the shipped YAMLs through the harness itself


def _harness_tasks(files: dict[str, Path], tmp_path: Path) -> dict:
    """Load our local tasks with the harness's TaskManager, exactly as evaluate_zeroshot does."""
    from lm_eval.tasks import TaskManager

    from losa_deploy.evaluation.zeroshot import _datasets_offline, _harness_io, _write_local_task

    names = {n: _write_local_task(tmp_path, n, str(p), None) for n, p in files.items()}
    with _harness_io(False, ""), _datasets_offline(True):
        tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
        loaded = tm.load_task_or_group(list(names.values()))
    return {n: loaded[h] for n, h in names.items()}


def test_shipped_configs_render_the_harness_prompts(files, tmp_path):
    t = _harness_tasks(files, tmp_path)

    def first(name):
        task = t[name]
        doc = list(task.test_docs())[0]
        return task, doc, task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)

    _, _, text, ch, tgt = first("piqa")
    assert text == "Question: How do I ready a guinea pig cage?\nAnswer:"
    assert ch == ["Add paper bedding.", "Add jeans bedding."] and tgt == 0

    _, _, text, ch, tgt = first("arc_easy")
    assert text == "Question: Which is a gas?\nAnswer:" and ch == ["ice", "steam", "rock"] and tgt == 1
    doc2 = list(t["arc_easy"].test_docs())[1]
    assert t["arc_easy"].doc_to_target(doc2) == 1  # digit answer key "2" -> index 1

    _, _, text, ch, tgt = first("boolq")
    assert text == "Sky -- The sky looks blue on clear days.\nQuestion: is the sky blue?\nAnswer:"
    assert ch == ["no", "yes"] and tgt == 1

    task, _, text, ch, tgt = first("hellaswag")
    assert text == "Roof shingle removal: A man is sitting on a roof. He"  # the harness capitalises ctx_b
    assert ch[3] == "starts pulling up roofing on a roof." and tgt == 3
    doc = list(task.test_docs())[1]
    assert task.doc_to_text(doc) == ("Health: How to use aromatherapy for depression. Know what oils help with which "
                                     "symptoms. Basil works against fatigue.")
    assert task.doc_to_choice(doc)[1] == "Eat a. sandwich."  # harness preprocess: " [title]" -> ". "

    # WinoGrande partial evaluation: the gold option index as "text", option-filled prefixes as choices,
    # the shared continuation after the blank as the target
    _, _, text, ch, tgt = first("winogrande")
    assert text == 0
    assert ch == ["Sarah was a much better surgeon than Maria so Sarah",
                  "Sarah was a much better surgeon than Maria so Maria"]
    assert tgt == "always got the harder cases."

    _, _, text, ch, tgt = first("openbookqa")
    assert text == "The sun is responsible for" and tgt == 1

    _, _, text, ch, tgt = first("rte")
    assert text == ("Dana Reeve, the widow of the actor, died at 44.\n"
                    "Question: Christopher Reeve had an accident. True or False?\nAnswer:")
    assert ch == ["True", "False"] and tgt == 1


# ------------------------------------------------------------------------ end to end on the tiny random model


@torch.no_grad()
def _manual_scores(model, tok, context: str, choices: list[str]) -> tuple[list[float], list[float]]:
    """Summed log-likelihood of " " + choice after the context, and that per character: the harness's acc / acc_norm."""
    lls, norm = [], []
    for c in choices:
        ctx = tok(context, add_special_tokens=False).input_ids
        cont = tok(" " + c, add_special_tokens=False).input_ids
        ids = torch.tensor([ctx + cont])
        logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]
        ll = float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
        lls.append(ll)
        norm.append(ll / len(c))  # the harness divides by the choice's length in characters
    return lls, norm


def test_evaluate_zeroshot_tiny_model_matches_independent_loglikelihoods(files):
    from tiny import byte_tokenizer, tiny_model

    from losa_deploy.evaluation.zeroshot import evaluate_zeroshot

    model, tok = tiny_model(), byte_tokenizer()
    res = evaluate_zeroshot(model, tok, {"piqa": str(files["piqa"]), "hellaswag": str(files["hellaswag"])},
                            limit=3, batch_size=2, progress=False)
    assert set(res["tasks"]) == {"piqa", "hellaswag"} and res["limit"] == 3 and res["num_fewshot"] == 0
    # independent scoring of the same 3 items of each task
    from lm_eval.tasks.hellaswag.utils import preprocess

    piqa = [(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"])
            for r in L.load_piqa(files["piqa"], 3)]
    hs = []
    for r in L.load_hellaswag(files["hellaswag"], 3):
        q = preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        hs.append((q, [preprocess(e) for e in r["endings"]], int(r["label"])))
    for name, items in (("piqa", piqa), ("hellaswag", hs)):
        acc = acc_norm = 0
        for ctx, ch, gold in items:
            lls, norm = _manual_scores(model, tok, ctx, ch)
            acc += max(range(len(ch)), key=lls.__getitem__) == gold
            acc_norm += max(range(len(ch)), key=norm.__getitem__) == gold
        r = res["tasks"][name]
        assert r["n"] == 3
        assert 0.0 <= r["acc"] <= 1.0
        assert r["acc"] == pytest.approx(acc / 3) and r["acc_norm"] == pytest.approx(acc_norm / 3)
        assert r["acc_stderr"] == pytest.approx(math.sqrt(r["acc"] * (1 - r["acc"]) / 2))  # sample sd / sqrt(n)
    assert res["average"]["acc"] == pytest.approx((res["tasks"]["piqa"]["acc"] + res["tasks"]["hellaswag"]["acc"]) / 2)


def test_evaluate_zeroshot_winogrande_rte_openbookqa_tiny(files):
    from tiny import byte_tokenizer, tiny_model

    from losa_deploy.evaluation.zeroshot import evaluate_zeroshot

    tasks = {k: str(files[k]) for k in ("winogrande", "rte", "openbookqa")}
    res = evaluate_zeroshot(tiny_model(), byte_tokenizer(), tasks, limit=4, progress=False)
    assert {k: v["n"] for k, v in res["tasks"].items()} == {"winogrande": 2, "rte": 2, "openbookqa": 1}
    assert "acc_norm" not in res["tasks"]["rte"] and "acc_norm" in res["tasks"]["openbookqa"]


def test_evaluate_zeroshot_rejects_unknown_harness_task_and_bad_args(files):
    from tiny import byte_tokenizer, tiny_model

    from losa_deploy.evaluation.zeroshot import evaluate_zeroshot

    with pytest.raises(UserError, match="unknown task"):
        evaluate_zeroshot(tiny_model(), byte_tokenizer(), {"no_such_task_xyz": None}, limit=2, progress=False)
    with pytest.raises(UserError, match="limit"):
        evaluate_zeroshot(tiny_model(), byte_tokenizer(), {"piqa": str(files["piqa"])}, limit=0, progress=False)
    with pytest.raises(UserError, match="no zero-shot tasks"):
        evaluate_zeroshot(tiny_model(), byte_tokenizer(), {}, limit=2)


def test_cli_evaluate_tasks_only_skips_perplexity(files, tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from losa_deploy.cli import app

    out = tmp_path / "zs.json"
    r = CliRunner().invoke(app, ["evaluate", str(tiny_dir), "--task-data", f"piqa={files['piqa']}",
                                 "--task-data", f"rte={files['rte']}", "--limit", "2", "--batch-size", "2",
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert "perplexity" not in d
    assert d["zeroshot"]["tasks"]["piqa"]["n"] == 2 and d["zeroshot"]["tasks"]["rte"]["n"] == 2


def test_cli_evaluate_bad_task_data_is_a_one_line_error(tiny_dir, tmp_path):
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("losa-deploy")
    r = subprocess.run([str(exe), "evaluate", str(tiny_dir), "--task-data",
                        f"piqa={tmp_path / 'missing.jsonl'}"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "error:" in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.integration
def test_real_model_piqa_and_arc_easy_above_chance(shared_data):
    from losa_deploy.evaluation.zeroshot import evaluate_zeroshot
    from losa_deploy.models import load_model

    model, tok = load_model("smollm2-135m")
    res = evaluate_zeroshot(model, tok, {"piqa": str(shared_data / "piqa" / "valid.jsonl"),
                                         "arc_easy": str(shared_data / "arc" / "ARC-Easy-Test.jsonl")},
                            limit=50, progress=False)
    piqa, arc = res["tasks"]["piqa"], res["tasks"]["arc_easy"]
    assert piqa["n"] == 50 and arc["n"] == 50
    assert piqa["acc"] >= 0.56, piqa  # chance 0.5; SmolLM2-135M is ~0.6-0.7 on PIQA
    assert arc["acc"] >= 0.35, arc  # chance ~0.25
