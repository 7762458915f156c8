"""Problem tables: built-in seeded tasks, user dataset files and GSM8K."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.ids import prompt_id
from selfimprove_dagster.sources.datasets import load_gsm8k
from selfimprove_dagster.sources.tasks import (
    PROBLEM_SCHEMA,
    TASKS,
    load_dataset_file,
    make_task,
)
from selfimprove_dagster.verifiers.numeric import normalize_number

GSM8K_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"
GSM8K_TEST_ROWS = 1319  # counted: `wc -l test.jsonl`, no blank lines, no duplicate questions


def _keys(prompts: pl.Series) -> set[str]:
    return {" ".join(p.lower().split()) for p in prompts}


def _assert_valid_table(table: pl.DataFrame) -> None:
    assert dict(table.schema) == PROBLEM_SCHEMA
    assert table["prompt_id"].to_list() == [prompt_id(p) for p in table["prompt"]]
    assert all(normalize_number(a) == a for a in table["answer"])  # canonical strings
    assert set(table["split"]) <= {"train", "eval"}
    train = table.filter(pl.col("split") == "train")["prompt"]
    eval_ = table.filter(pl.col("split") == "eval")["prompt"]
    assert len(_keys(train)) == len(train)  # no duplicates within a split
    assert len(_keys(eval_)) == len(eval_)
    assert not _keys(train) & _keys(eval_)  # disjoint splits


# --- built-in tasks -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_make_task_sizes_and_disjoint(name: str) -> None:
    table = make_task(name, n_train=200, n_eval=100, seed=0)
    _assert_valid_table(table)
    assert table["split"].value_counts().sort("split").rows() == [("eval", 100), ("train", 200)]
    assert set(table["task"]) == {name}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_make_task_is_deterministic_per_seed(name: str) -> None:
    first = make_task(name, n_train=50, n_eval=20, seed=7)
    assert first.equals(make_task(name, n_train=50, n_eval=20, seed=7))
    assert not first.equals(make_task(name, n_train=50, n_eval=20, seed=8))


def test_make_task_eval_set_does_not_depend_on_n_train() -> None:
    small = make_task("addition_2digit", n_train=10, n_eval=30, seed=3)
    large = make_task("addition_2digit", n_train=300, n_eval=30, seed=3)
    evals = [t.filter(pl.col("split") == "eval")["prompt"].to_list() for t in (small, large)]
    assert evals[0] == evals[1]


def test_addition_prompts_and_answers() -> None:
    table = make_task("addition_2digit", n_train=100, n_eval=0, seed=1)
    for prompt, answer in table.select("prompt", "answer").rows():
        match = re.fullmatch(r"What is (\d+) \+ (\d+)\? Answer with just the number\.", prompt)
        assert match, prompt
        a, b = int(match[1]), int(match[2])
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert answer == str(a + b)


def test_word_problems_answers_are_consistent() -> None:
    table = make_task("word_problems", n_train=300, n_eval=0, seed=2)
    operations = set()
    for prompt, answer in table.select("prompt", "answer").rows():
        assert prompt.endswith(" Answer with just the number.")
        a, b = (int(n) for n in re.findall(r"\d+", prompt))
        assert 2 <= a <= 50 and 2 <= b <= 50
        assert int(answer) in (a + b, a - b)
        assert int(answer) >= 0  # subtraction never goes negative
        operations.add("add" if int(answer) == a + b else "subtract")
    assert operations == {"add", "subtract"}


def test_make_task_unknown_name_lists_known_tasks() -> None:
    with pytest.raises(SelfImproveError, match="unknown task 'multiplication'") as err:
        make_task("multiplication", n_train=1, n_eval=1, seed=0)
    assert "addition_2digit" in str(err.value) and "word_problems" in str(err.value)


def test_make_task_too_many_problems_suggests_smaller_n() -> None:
    # 2-digit addition has only 90 * 90 = 8,100 distinct problems.
    with pytest.raises(SelfImproveError, match="smaller n_train / n_eval"):
        make_task("addition_2digit", n_train=8_000, n_eval=200, seed=0)


def test_make_task_rejects_negative_count() -> None:
    with pytest.raises(SelfImproveError, match="n_eval=-1 is not a count"):
        make_task("addition_2digit", n_train=1, n_eval=-1, seed=0)


# --- user dataset files ---------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _problems(n: int) -> list[dict]:
    # Answers deliberately mix ints, floats and formatted strings.
    def answer(i: int) -> object:
        return [i, float(i), f"{i * 1000:,}", f"${i}"][i % 4]

    return [{"prompt": f"Question {i}?", "answer": answer(i)} for i in range(n)]


def test_load_jsonl_splits_by_fraction(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mine.jsonl", _problems(20))
    table = load_dataset_file(path, n_train=None, n_eval=None, seed=0, eval_fraction=0.25)
    _assert_valid_table(table)
    assert table["split"].value_counts().sort("split").rows() == [("eval", 5), ("train", 15)]
    assert set(table["task"]) == {"mine"}
    answers = dict(table.select("prompt", "answer").rows())
    assert answers["Question 6?"] == "6000"  # "6,000" normalized
    assert answers["Question 5?"] == "5"  # 5.0 normalized
    assert answers["Question 7?"] == "7"  # "$7" normalized
    again = load_dataset_file(path, n_train=None, n_eval=None, seed=0, eval_fraction=0.25)
    assert table.equals(again)


def test_load_jsonl_takes_first_n_of_each_split(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mine.jsonl", _problems(20))
    table = load_dataset_file(path, n_train=4, n_eval=3, seed=0)
    assert table["split"].value_counts().sort("split").rows() == [("eval", 3), ("train", 4)]


def test_load_jsonl_asking_for_too_many_rows(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mine.jsonl", _problems(10))
    with pytest.raises(SelfImproveError, match=r"n_train=50 but .* has only 5 distinct train"):
        load_dataset_file(path, n_train=50, n_eval=None, seed=0)


def test_load_split_column_dedupes_and_keeps_eval_clean(tmp_path: Path) -> None:
    rows = [
        {"prompt": "What is 1 + 1?", "answer": 2, "split": "train"},
        {"prompt": "what is  1 + 1?", "answer": 2, "split": "train"},  # duplicate in train
        {"prompt": "What is 2 + 2?", "answer": 4, "split": "train"},  # also in test below
        {"prompt": "What is 3 + 3?", "answer": 6, "split": "train"},
        {"prompt": "What is 2 + 2?", "answer": 4, "split": "test"},  # "test" means eval
        {"prompt": "What is 5 + 5?", "answer": 10, "split": "eval"},
    ]
    table = load_dataset_file(_write_jsonl(tmp_path / "s.jsonl", rows), None, None, seed=0)
    _assert_valid_table(table)
    split_of = dict(table.select("prompt", "split").rows())
    assert split_of == {
        "What is 1 + 1?": "train",
        "What is 3 + 3?": "train",
        "What is 2 + 2?": "eval",
        "What is 5 + 5?": "eval",
    }


def test_load_bad_split_value(tmp_path: Path) -> None:
    rows = [{"prompt": "q", "answer": 1, "split": "holdout"}]
    with pytest.raises(SelfImproveError, match=r"row 1 .* has split 'holdout'"):
        load_dataset_file(_write_jsonl(tmp_path / "s.jsonl", rows), None, None, seed=0)


def test_load_parquet(tmp_path: Path) -> None:
    path = tmp_path / "arith.parquet"
    pl.DataFrame(
        {"prompt": [f"{i} + 1?" for i in range(10)], "answer": list(range(1, 11))}
    ).write_parquet(path)
    table = load_dataset_file(path, n_train=None, n_eval=None, seed=1)
    _assert_valid_table(table)
    assert table.height == 10 and set(table["task"]) == {"arith"}
    assert sorted(table["answer"].cast(pl.Int64)) == list(range(1, 11))


def test_load_gsm8k_format_from_jsonl(tmp_path: Path) -> None:
    rows = [
        {"question": "Ducks lay 16 eggs...", "answer": "16 - 3 = <<16-3=13>>13\n#### 13"},
        {"question": "A shop sells...", "answer": "It is 1,000 + 250\n#### 1,250"},
    ]
    path = _write_jsonl(tmp_path / "gsm.jsonl", rows)
    table = load_dataset_file(path, n_train=None, n_eval=None, seed=0, eval_fraction=0)
    assert dict(table.select("prompt", "answer").rows()) == {
        "Ducks lay 16 eggs...": "13",
        "A shop sells...": "1250",
    }


def test_load_missing_columns_names_them(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "What is 2 + 2?", "solution": 4}])
    with pytest.raises(SelfImproveError) as err:
        load_dataset_file(path, None, None, seed=0)
    message = str(err.value)
    assert "missing column(s) `answer`" in message
    assert "found `prompt`, `solution`" in message
    assert "expected `prompt` and `answer`, or GSM8K's `question` and `answer`" in message


def test_load_missing_columns_parquet(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pl.DataFrame({"text": ["hi"], "label": [1]}).write_parquet(path)
    with pytest.raises(SelfImproveError, match=r"missing column\(s\) `prompt`, `answer`"):
        load_dataset_file(path, None, None, seed=0)


def test_load_non_numeric_answer_names_row(tmp_path: Path) -> None:
    rows = [{"prompt": "a?", "answer": 1}, {"prompt": "b?", "answer": "two"}]
    with pytest.raises(SelfImproveError, match=r"row 2 .* answer that is not a number: 'two'"):
        load_dataset_file(_write_jsonl(tmp_path / "bad.jsonl", rows), None, None, seed=0)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SelfImproveError, match="does not exist"):
        load_dataset_file(tmp_path / "nope.jsonl", None, None, seed=0)


def test_load_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt,answer\nq,1\n")
    with pytest.raises(SelfImproveError, match=r"unsupported extension '\.csv'"):
        load_dataset_file(path, None, None, seed=0)


def test_load_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(SelfImproveError, match="is empty"):
        load_dataset_file(path, None, None, seed=0)


def test_load_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "q", "answer": 1}\n{"prompt": \n')
    with pytest.raises(SelfImproveError, match=r"line 2 .* not valid JSON"):
        load_dataset_file(path, None, None, seed=0)


def test_load_latin1_file_says_it_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "Combien coûte un café ?", "answer": 2}\n'.encode("latin-1"))
    with pytest.raises(SelfImproveError, match=r"not UTF-8 text") as err:
        load_dataset_file(path, None, None, seed=0)
    assert "iconv" in err.value.fix


def test_load_corrupt_parquet_says_so(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not a parquet body")
    with pytest.raises(SelfImproveError, match=r"not a readable Parquet file"):
        load_dataset_file(path, None, None, seed=0)


# --- the real GSM8K test file -------------------------------------------------------


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason=f"GSM8K test file not found at {GSM8K_TEST}")
def test_load_gsm8k_test_file() -> None:
    table = load_gsm8k(GSM8K_TEST)
    _assert_valid_table(table)
    assert table.height == GSM8K_TEST_ROWS
    assert set(table["split"]) == {"eval"}  # test.jsonl is held out
    assert set(table["task"]) == {"gsm8k"}
    answers = table["answer"].to_list()
    assert all(normalize_number(a) is not None for a in answers)
    assert "1450000" in answers  # "#### 1,450,000" in the file
    assert any(a.startswith("-") for a in answers)  # GSM8K has a few negative answers
    first = table.filter(pl.col("prompt").str.starts_with("Janet\u2019s ducks lay 16 eggs"))
    assert first["answer"].to_list() == ["18"]


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason=f"GSM8K test file not found at {GSM8K_TEST}")
def test_load_gsm8k_file_with_fraction_split() -> None:
    table = load_dataset_file(GSM8K_TEST, n_train=100, n_eval=50, seed=0)
    _assert_valid_table(table)
    assert table["split"].value_counts().sort("split").rows() == [("eval", 50), ("train", 100)]
    assert set(table["task"]) == {"test"}  # the file's stem


def test_word_problems_differing_only_in_names_are_one_problem():
    """Same numbers, same answer, other name/object: never in both train and eval."""
    from selfimprove_dagster.quality.gates import gate_no_contamination

    for seed in range(3):
        table = make_task("word_problems", n_train=200, n_eval=200, seed=seed)
        train = table.filter(pl.col("split") == "train")
        eval_ = table.filter(pl.col("split") == "eval")
        assert gate_no_contamination(train, eval_).passed, seed
