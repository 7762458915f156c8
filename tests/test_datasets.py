"""Dataset shapes and the shared public sets: every shape loads into one problem table
whose rows carry what their verifier needs; contaminated train rows can be dropped at
load time, each recorded with the eval row it matched."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.quality.gates import gate_no_contamination
from selfimprove_dagster.sources import datasets
from selfimprove_dagster.sources.answer_format import apply_answer_format, hinted_prompt
from selfimprove_dagster.sources.tasks import PROBLEM_SCHEMA, load_dataset_file
from selfimprove_dagster.text import normalize_prompt
from selfimprove_dagster.verifiers.dispatch import verify_rows
from tests.conftest import SHARED_DATA


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_commonsenseqa_loads_as_multiple_choice():
    table = datasets.load_commonsenseqa(SHARED_DATA / "commonsenseqa", n_train=20, n_eval=10)
    assert dict(table.schema) == PROBLEM_SCHEMA
    assert table["split"].value_counts().sort("split")["count"].to_list() == [10, 20]
    assert set(table["verifier"]) == {"multiple_choice"}
    assert set(table["answer"]) <= set("ABCDE")
    row = table.row(0, named=True)
    assert set(json.loads(row["choices"])) == set("ABCDE")
    assert "\nA. " in row["prompt"]  # the options are shown once, not twice
    assert row["prompt"].count("\nA. ") == 1


def test_mbpp_loads_as_code_with_tests_and_its_reference_solutions_pass():
    table = datasets.load_mbpp(SHARED_DATA / "mbpp", n_train=6, n_eval=6)
    assert set(table["verifier"]) == {"code"}
    rows = table.to_dicts()
    assert all(len(r["tests"]) >= 1 for r in rows)
    assert "Your code should pass these tests:" in rows[0]["prompt"]
    verdicts = verify_rows([r["answer"] for r in rows], rows)
    assert all(v.correct for v in verdicts), [v.reason for v in verdicts if not v.correct]


def test_math500_loads_with_latex_answers():
    table = datasets.load_math500(SHARED_DATA / "math500/test.jsonl", n_train=10, n_eval=10)
    assert set(table["verifier"]) == {"math"}
    assert table.filter(pl.col("split") == "eval").height == 10
    again = datasets.load_math500(SHARED_DATA / "math500/test.jsonl", n_train=5, n_eval=10)
    eval_ids = lambda t: t.filter(pl.col("split") == "eval")["prompt_id"].to_list()  # noqa: E731
    assert eval_ids(table) == eval_ids(again)  # held-out set independent of n_train


def test_gsm8k_still_loads_as_numeric():
    table = load_dataset_file(SHARED_DATA / "gsm8k/test.jsonl", n_train=5, n_eval=5, seed=0)
    assert set(table["verifier"]) == {"numeric"}
    assert all(a.lstrip("-").replace(".", "").isdigit() for a in table["answer"])


def test_a_folder_of_split_files_loads(tmp_path: Path):
    folder = tmp_path / "mine"
    folder.mkdir()
    _write_jsonl(
        folder / "train.jsonl", [{"prompt": f"What is {i} + 1?", "answer": i + 1} for i in range(5)]
    )
    _write_jsonl(
        folder / "dev.jsonl", [{"prompt": f"What is {i} + 2?", "answer": i + 2} for i in range(3)]
    )
    table = load_dataset_file(folder, None, None, seed=0)
    assert table.filter(pl.col("split") == "eval").height == 3
    assert table["task"][0] == "mine"


def test_a_users_file_of_every_shape_loads(tmp_path: Path):
    rows = [
        {"prompt": "What is 2 + 2?", "answer": 4},
        {"question": "Tom has 3 pens and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
        {"question": "Where are books lent?", "choices": ["bank", "library"], "answer": "B"},
        {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}", "solution": "..."},
        {
            "text": "Write add(a, b).",
            "test_list": ["assert add(1, 1) == 2"],
            "code": "def add(a, b): return a + b",
        },
        {
            "task_id": "HumanEval/0",
            "prompt": 'def neg(x):\n    """Negate."""\n',
            "canonical_solution": "    return -x\n",
            "test": "def check(candidate):\n    assert candidate(2) == -2\n",
            "entry_point": "neg",
        },
        {
            "prompt": "Spell 'cat' backwards.",
            "answer": "tac",
            "verifier": "tests.test_verifiers:exact_text",
        },
    ]
    table = load_dataset_file(
        _write_jsonl(tmp_path / "mixed.jsonl", rows), None, None, seed=0, eval_fraction=0
    )
    by_prompt = {r["prompt"].split("\n")[0]: r for r in table.to_dicts()}
    assert by_prompt["What is 2 + 2?"]["verifier"] == "numeric"
    assert by_prompt["Tom has 3 pens and buys 2. How many?"]["answer"] == "5"
    choice = by_prompt["Where are books lent?"]
    assert choice["verifier"] == "multiple_choice" and choice["prompt"].endswith("B. library")
    assert by_prompt["Simplify $\\frac{2}{4}$."]["verifier"] == "math"
    assert by_prompt["Write add(a, b)."]["tests"] == ["assert add(1, 1) == 2"]
    humaneval = by_prompt["Complete the Python function below."]
    assert (humaneval["verifier"], humaneval["entry_point"]) == ("code", "neg")
    assert verify_rows([humaneval["answer"]], [humaneval])[0].correct
    assert by_prompt["Spell 'cat' backwards."]["verifier"] == "tests.test_verifiers:exact_text"


def test_verifier_setting_applies_where_no_column_overrides(tmp_path: Path):
    rows = [
        {"prompt": "Simplify 2/4.", "answer": "\\frac{1}{2}"},
        {"prompt": "What is 1 + 1?", "answer": "2", "verifier": "numeric"},
    ]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    table = load_dataset_file(path, None, None, seed=0, eval_fraction=0, verifier="math")
    assert sorted(table["verifier"]) == ["math", "numeric"]
    with pytest.raises(SelfImproveError, match="not a number"):
        load_dataset_file(path, None, None, seed=0, eval_fraction=0)  # numeric by default


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": "Write f.", "test_list": []}, "empty `test_list`"),
        ({"prompt": "Q?", "choices": ["only one"], "answer": "A"}, "fewer than two options"),
        ({"prompt": "Q?", "choices": ["a", "b"], "answer": "Z"}, "neither a label nor a choice"),
        ({"prompt": "Q?", "answer": "x", "verifier": "regex"}, "unknown verifier 'regex'"),
        ({"prompt": "def f():\n", "test": "", "entry_point": "f"}, "no `test` code"),
    ],
)
def test_bad_rows_name_the_row_and_the_fix(tmp_path: Path, record: dict, message: str):
    with pytest.raises(SelfImproveError, match=message):
        load_dataset_file(_write_jsonl(tmp_path / "bad.jsonl", [record]), None, None, seed=0)


def test_near_duplicate_train_rows_are_dropped_and_recorded(tmp_path: Path):
    """The same word problem with another name is blocked by the contamination gate;
    `drop_contaminated` drops it at load time and records the eval row it matched."""
    rows = [
        {
            "prompt": "Sam has 23 apples and buys 19 more. How many apples does Sam have?",
            "answer": 42,
            "split": "eval",
        },
        {
            "prompt": "Mia has 23 apples and buys 19 more. How many apples does Mia have?",
            "answer": 42,
            "split": "train",
        },
        {
            "prompt": "Leo has 5 cards and gives away 2. How many cards are left?",
            "answer": 3,
            "split": "train",
        },
    ]
    path = _write_jsonl(tmp_path / "contaminated.jsonl", rows)
    kept = load_dataset_file(path, None, None, seed=0)
    gate = gate_no_contamination(
        kept.filter(pl.col("split") == "train"), kept.filter(pl.col("split") == "eval")
    )
    assert not gate.passed and "SELFIMPROVE_DROP_CONTAMINATED" in gate.message

    dropped: list[dict] = []
    clean = load_dataset_file(path, None, None, seed=0, drop_contaminated=True, dropped=dropped)
    assert clean.filter(pl.col("split") == "train")["prompt"].to_list() == [rows[2]["prompt"]]
    assert [(d["prompt"], d["eval_prompt"], d["match"]) for d in dropped] == [
        (rows[1]["prompt"], rows[0]["prompt"], "near")
    ]
    assert gate_no_contamination(
        clean.filter(pl.col("split") == "train"), clean.filter(pl.col("split") == "eval")
    ).passed


def test_contamination_sees_shuffled_choices_as_the_same_question():
    a = "Where do you borrow books?\nA. bank\nB. library\nC. mall"
    b = "Where do you borrow books?\nA. library\nB. mall\nC. bank"
    assert normalize_prompt(a) == normalize_prompt(b)
    train, eval_ = pl.DataFrame({"prompt": [b]}), pl.DataFrame({"prompt": [a]})
    assert not gate_no_contamination(train, eval_).passed


def test_contamination_gate_works_on_code_prompts():
    table = datasets.load_mbpp(SHARED_DATA / "mbpp", n_train=30, n_eval=30)
    train, eval_ = table.filter(pl.col("split") == "train"), table.filter(pl.col("split") == "eval")
    assert gate_no_contamination(train, eval_).passed
    assert not gate_no_contamination(eval_.head(3), eval_).passed


def test_rationale_format_rewrites_prompts_and_ids():
    table = datasets.load_commonsenseqa(SHARED_DATA / "commonsenseqa", n_train=3, n_eval=2)
    rationale = apply_answer_format(table, "rationale")
    assert all('"Answer: <letter>"' in p for p in rationale["prompt"])
    assert rationale["prompt_id"].to_list() != table["prompt_id"].to_list()
    short = apply_answer_format(table, "short")
    assert all(p.endswith("Answer with the letter of the correct choice.") for p in short["prompt"])
    hinted = hinted_prompt(rationale["prompt"][0], "B")
    assert "Hint: the correct answer is B." in hinted
    assert hinted.count("Think step by step") == 0  # the format line is replaced, not doubled
    with pytest.raises(SelfImproveError, match="unknown answer format 'essay'"):
        apply_answer_format(table, "essay")
