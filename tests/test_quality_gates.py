"""Blocking gates in `quality`: contamination of the training set and eval regression,
each on clean data and on data with a planted defect."""

from __future__ import annotations

import random
import string
import time

import polars as pl
import pytest

from selfimprove_dagster.quality import gates as quality
from selfimprove_dagster.sources.tasks import make_task
from selfimprove_dagster.text import normalize_prompt

EVAL = pl.DataFrame(
    {"prompt": ["what is 23 + 45 ?", "What is 60 + 17? Answer with just the number."]}
)


def _rows(*prompts: str) -> pl.DataFrame:
    return pl.DataFrame(
        {"generation_id": [f"g{i}" for i in range(len(prompts))], "prompt": prompts}
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("What is 23 + 45?", "what is 23 + 45"),
        ("  what is 23 + 45 ?  ", "what is 23 + 45"),
        ("What\tis\n23 + 45?!", "what is 23 + 45"),
        ("Ｗhat is 23 + 45?", "what is 23 + 45"),  # full-width letter (NFKC)
    ],
)
def test_normalize_prompt(text, expected):
    assert normalize_prompt(text) == expected


def test_no_contamination_passes_on_different_problems():
    clean = _rows(
        "What is 23 + 46?",  # one digit away: a different problem, not a near-duplicate
        "What is 45 + 23?",  # commuted: the tasks keep these as distinct problems
        "What is 23 - 45?",  # another operator
        "What is 61 + 17? Answer with just the number.",
    )
    gate = quality.gate_no_contamination(clean, EVAL)
    assert gate.passed, gate.message
    assert gate.observed == 0


def test_exact_duplicate_of_an_eval_prompt_fails():
    rows = _rows(
        "What is 10 + 20?",
        "What is 23 + 45?",  # planted: the eval prompt "what is 23 + 45 ?" re-cased
        "What is 23 + 45?",  # planted: a second row with the same prompt
    )
    gate = quality.gate_no_contamination(rows, EVAL)
    assert not gate.passed
    assert gate.observed == 2
    assert gate.details["contaminated_prompts"] == [
        {
            "prompt": "What is 23 + 45?",
            "eval_prompt": "what is 23 + 45 ?",
            "match": "exact",
            "similarity": 1.0,
        }
    ]
    assert "'What is 23 + 45?'" in gate.message


def test_near_duplicate_with_the_same_numbers_fails():
    rows = _rows(
        "What is 60+17? Answer with just the number",  # planted: re-spaced eval prompt
        "What is 60 + 71? Answer with just the number.",  # numbers differ: not a copy
    )
    gate = quality.gate_no_contamination(rows, EVAL)
    assert not gate.passed
    assert gate.observed == 1
    (found,) = gate.details["contaminated_prompts"]
    assert found["match"] == "near"
    assert found["eval_prompt"] == "What is 60 + 17? Answer with just the number."
    assert found["similarity"] >= 0.9


def test_reworded_word_problem_with_the_same_numbers_is_a_near_duplicate():
    eval_set = pl.DataFrame({"prompt": ["Sam has 23 apples and buys 29 more. How many now?"]})
    rows = _rows(
        "Max has 23 apples and buys 29 more. How many now?",  # planted: only the name differs
        "Max has 23 apples and buys 30 more. How many now?",  # another problem
    )
    gate = quality.gate_no_contamination(rows, eval_set)
    assert gate.observed == 1
    assert gate.details["contaminated_prompts"][0]["prompt"].startswith("Max has 23 apples")


def test_the_builtin_addition_split_is_clean():
    problems = make_task("addition_2digit", n_train=200, n_eval=200, seed=0)
    train, eval_ = (problems.filter(pl.col("split") == s) for s in ("train", "eval"))
    assert quality.gate_no_contamination(train, eval_).passed


def test_contamination_check_is_fast_on_prompts_without_numbers():
    # Numberless prompts all share one quantity group: the worst case for the pair loop.
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(300)]

    def prompt() -> str:
        return "Write a short note about " + " ".join(rng.choices(words, k=rng.randint(5, 12)))

    train, eval_ = _rows(*(prompt() for _ in range(400))), _rows(*(prompt() for _ in range(200)))
    started = time.perf_counter()
    gate = quality.gate_no_contamination(train, eval_)
    assert time.perf_counter() - started < 1.0
    assert gate.passed


def test_no_regression_within_tolerance_passes():
    # 0.6 - 0.1 is 0.49999999999999994 in floats: exactly at the floor must pass.
    gate = quality.gate_no_regression(0.6, 0.5, tolerance=0.1)
    assert gate.passed
    assert gate.threshold == pytest.approx(0.5)
    assert quality.gate_no_regression(0.6, 0.8, tolerance=0.0).passed


def test_regression_beyond_tolerance_fails():
    # Planted: accuracy fell 0.6 -> 0.45, more than the 0.1 tolerance.
    gate = quality.gate_no_regression(0.6, 0.45, tolerance=0.1)
    assert not gate.passed
    assert gate.observed == 0.45
    assert gate.details["delta"] == pytest.approx(-0.15)
    assert "60.0% -> 45.0%" in gate.message


def test_critic_readable_warns_on_unscored_judgements():
    import polars as pl

    from selfimprove_dagster.quality.gates import gate_critic_readable

    clean = pl.DataFrame({"score": [1.0, 0.2, 0.0]})
    mostly_garbage = pl.DataFrame({"score": [1.0, None, None]})  # planted: 2 of 3 unscored
    assert gate_critic_readable(clean, 0.5).passed
    gate = gate_critic_readable(mostly_garbage, 0.5)
    assert not gate.passed and gate.observed == pytest.approx(2 / 3)
    assert "Fix:" in gate.message
