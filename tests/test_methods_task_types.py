"""The critics on every task type a round can hold: the majority vote, the refiner's
accept check and the judge's ground truth read each row's verifier (numeric, multiple
choice, math, code); a vote on code is refused with one message naming the fix."""

from __future__ import annotations

import json

import polars as pl
import pytest

from selfimprove_dagster.engines.base import Sampling
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.methods import consistency, critique_rows, judge, refine
from tests.test_methods import _JudgeEngine, _refinements

CHOICES = json.dumps({"A": "bank", "B": "library", "C": "school"})
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def _generations(answers: dict[str, list[str]]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "round": "round_000",
                "generation_id": f"{prompt_id}-{i}",
                "prompt_id": prompt_id,
                "sample_index": i,
                "prompt": f"question {prompt_id}",
                "completion": text,
            }
            for prompt_id, texts in answers.items()
            for i, text in enumerate(texts)
        ]
    )


def _prompts(rows: dict[str, dict]) -> pl.DataFrame:
    """prompt_id -> {answer, verifier, choices, tests} as the round's prompts table has them."""
    return pl.DataFrame(
        [
            {
                "prompt_id": pid,
                "prompt": f"question {pid}",
                "split": "train",
                "answer": r.get("answer"),
                "verifier": r.get("verifier"),
                "choices": r.get("choices"),
                "tests": r.get("tests"),
            }
            for pid, r in rows.items()
        ],
        schema={
            "prompt_id": pl.String,
            "prompt": pl.String,
            "split": pl.String,
            "answer": pl.String,
            "verifier": pl.String,
            "choices": pl.String,
            "tests": pl.List(pl.String),
        },
    )


MC = {"answer": "B", "verifier": "multiple_choice", "choices": CHOICES}
MATH = {"answer": "\\frac{1}{2}", "verifier": "math"}
CODE = {"answer": "def add(a, b):\n    return a + b", "verifier": "code", "tests": ADD_TESTS}


# --- answers per task type -----------------------------------------------------------


def test_extract_for_reads_each_verifiers_answer_without_a_reference():
    assert critique_rows.extract_for("so 12 + 3 = 15", {"answer": None}) == "15"
    assert critique_rows.extract_for("The answer is (B).", MC) == "B"
    assert critique_rows.extract_for("library", MC) == "B"  # the option text alone
    assert critique_rows.extract_for("Thus $\\boxed{\\frac{1}{2}}$.", MATH) == "\\frac{1}{2}"
    code = critique_rows.extract_for("```python\ndef add(a, b):\n    return a + b\n```", CODE)
    assert code == "def add(a, b):\n    return a + b"
    assert critique_rows.extract_for("anything", {"verifier": "my_mod:check"}) is None


def test_ground_truths_follow_each_rows_verifier():
    generations = _generations(
        {"mc": ["The answer is (B).", "A. bank"], "math": ["\\boxed{0.5}", "\\boxed{2}"]}
    )
    truths = critique_rows.ground_truths(generations, _prompts({"mc": MC, "math": MATH}))
    assert [t.correct for t in truths] == [True, False, True, False]
    # math-verify reads a boxed 0.5 as the rational 1/2 and names it in LaTeX.
    assert [t.extracted for t in truths] == ["B", "A", "\\frac{1}{2}", "2"]


# --- self-consistency ----------------------------------------------------------------


def test_majority_vote_on_multiple_choice_counts_the_chosen_label():
    generations = _generations(
        {"mc": ["The answer is (B).", "B. library", "A", "library", "I do not know"]}
    )
    frame = consistency.critique_by_majority(generations, _prompts({"mc": MC}), 0.5)
    assert frame["pseudo_label"].to_list() == ["B"] * 5
    assert frame["verdict"].to_list() == ["accept", "accept", "reject", "accept", "reject"]
    assert frame["reason"].to_list() == ["agrees", "agrees", "disagrees", "agrees", "no_answer"]
    assert frame["extracted_answer"].to_list() == ["B", "B", "A", "B", None]
    assert frame["correct"].to_list() == [True, True, False, True, False]  # measured only


def test_majority_vote_on_math_groups_equivalent_answers():
    # 1/2 written three ways is one answer (3 of 5 votes); 1/3 is another.
    generations = _generations(
        {
            "math": [
                "So $\\boxed{\\frac{1}{2}}$.",
                "The answer is 0.5",
                "\\boxed{1/3}",
                "\\boxed{\\dfrac{1}{2}}",
                "\\boxed{1/3}",
            ]
        }
    )
    unlabeled = _prompts({"math": {**MATH, "answer": None}})
    frame = consistency.critique_by_majority(generations, unlabeled, 0.5)
    assert frame["pseudo_label"][0] == "\\frac{1}{2}"  # the class's first answer
    assert frame["verdict"].to_list() == ["accept", "accept", "reject", "accept", "reject"]
    assert frame["agreement"][0] == pytest.approx(0.6)
    assert frame["correct"].is_null().all()  # no reference: correctness unknown
    labeled = consistency.critique_by_majority(generations, _prompts({"math": MATH}), 0.5)
    assert labeled["verdict"].to_list() == frame["verdict"].to_list()  # truth never selects
    assert labeled["correct"].to_list() == [True, True, False, True, False]


def test_majority_vote_refuses_code_naming_the_fix():
    generations = _generations({"code": ["def add(a, b): return a + b"] * 2})
    with pytest.raises(SelfImproveError) as err:
        consistency.critique_by_majority(generations, _prompts({"code": CODE}), 0.5)
    text = str(err.value)
    assert "self_consistency cannot vote" in text and "1 prompts use `code`" in text
    assert "SELFIMPROVE_METHOD=star" in text


def test_check_votable_refuses_custom_verifiers_and_passes_the_others():
    consistency.check_votable(_prompts({"a": {"answer": "1"}, "b": MC, "c": MATH}))
    with pytest.raises(SelfImproveError, match="`my_mod:check`"):
        consistency.check_votable(_prompts({"a": {"answer": "x", "verifier": "my_mod:check"}}))


# --- self-refine ---------------------------------------------------------------------


def test_refined_answers_are_checked_by_each_rows_verifier():
    refinements = _refinements(
        [
            ("mc-0", "mc", False, "The answer is (B)."),  # repaired
            ("math-0", "math", False, "So it is $\\boxed{0.5}$."),  # repaired: = 1/2
            ("num-0", "num", False, "12"),  # still wrong
        ]
    )
    prompts = _prompts({"mc": MC, "math": MATH, "num": {"answer": "13"}})
    references = dict(zip(prompts["prompt_id"], prompts["answer"], strict=True))
    frame = refine.critique_refinements(refinements, references, references, prompts)
    assert frame["reason"].to_list() == ["repaired", "repaired", "still_rejected"]
    assert frame["correct"].to_list() == [True, True, False]
    assert frame["extracted_answer"].to_list() == ["B", "\\frac{1}{2}", "12"]


def test_refined_math_answer_is_checked_against_the_math_pseudo_label():
    refinements = _refinements([("math-0", "math", False, "\\boxed{0.5}")])
    prompts = _prompts({"math": {**MATH, "answer": "1/3"}})  # the reference disagrees
    frame = refine.critique_refinements(
        refinements, {"math": "\\frac{1}{2}"}, {"math": "1/3"}, prompts
    )
    assert frame["verdict"][0] == "accept"  # states the pseudo-label...
    assert frame["correct"][0] is False  # ...which ground truth says is wrong


def test_refined_code_runs_the_rows_tests():
    refinements = _refinements(
        [
            ("code-0", "code", False, "```python\ndef add(a, b):\n    return a + b\n```"),
            ("code2-0", "code2", False, "```python\ndef add(a, b):\n    return a - b\n```"),
        ]
    )
    prompts = _prompts({"code": CODE, "code2": CODE})
    references = dict(zip(prompts["prompt_id"], prompts["answer"], strict=True))
    frame = refine.critique_refinements(refinements, references, references, prompts)
    assert frame["reason"].to_list() == ["repaired", "still_rejected"]


def test_critic_feedback_on_code_names_the_failure_not_the_program():
    row = {
        "extracted_answer": "def add(a, b):\n    return a - b",
        "reason": "test_failed: test 1 `assert add(1, 2) == 3`: AssertionError",
        "critique": "the code fails: test_failed: test 1 `assert add(1, 2) == 3`",
    }
    assert refine.critic_feedback(row) == (
        "The code fails: test_failed: test 1 `assert add(1, 2) == 3`: AssertionError."
    )


# --- self-judge ----------------------------------------------------------------------


def test_judge_records_ground_truth_by_each_rows_verifier():
    generations = _generations({"mc": ["The answer is (B).", "A"]})
    engine = _JudgeEngine({"The answer is (B).": [" 5"], "A": [" 2"]})
    frame = judge.critique_by_judge(
        engine, generations, _prompts({"mc": MC}), Sampling(), 1, accept_points=4.0
    )
    assert frame["verdict"].to_list() == ["accept", "reject"]  # the judge's scores decide
    assert frame["correct"].to_list() == [True, False]  # the MC verifier measures
    assert frame["extracted_answer"].to_list() == ["B", "A"]
