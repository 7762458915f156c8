"""The verifier contract: one Verdict shape, picked per row (dispatch), for every task type;
the vectorized numeric / multiple-choice paths agree with the row-by-row ones."""

from __future__ import annotations

import json
import random
import sys

import polars as pl
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.verifiers import multiple_choice as mc
from selfimprove_dagster.verifiers import numeric
from selfimprove_dagster.verifiers.dispatch import (
    check_verifier,
    verifier_name,
    verify_row,
    verify_rows,
)
from selfimprove_dagster.verifiers.reward import make_verifier_reward
from selfimprove_dagster.verifiers.verdict import Verdict
from tests.conftest import SHARED_DATA

CHOICES = {"A": "bank", "B": "library", "C": "department store", "D": "mall", "E": "new york"}
CSQA_ROW = {"answer": "B", "choices": CHOICES, "verifier": "multiple_choice"}


# --- contract --------------------------------------------------------------------


def test_numeric_reexports_the_one_verdict_class():
    assert numeric.Verdict is Verdict
    with pytest.raises(AttributeError):
        Verdict(True, "1", "correct").correct = False  # frozen


def test_verifier_is_argument_then_column_then_numeric():
    assert verifier_name({"verifier": "math"}, "code") == "code"
    assert verifier_name({"verifier": "math"}) == "math"
    assert verifier_name({}) == "numeric"
    assert verify_row("The answer is 42", {"answer": "42"}) == Verdict(True, "42", "correct")


def test_unknown_verifier_names_the_choices():
    with pytest.raises(SelfImproveError, match="unknown verifier 'regex'.*multiple_choice"):
        check_verifier("regex")


def test_verify_rows_keeps_order_across_verifiers():
    rows = [
        {"answer": "7"},
        CSQA_ROW,
        {"answer": "\\frac{1}{2}", "verifier": "math"},
        {"answer": "8"},
    ]
    verdicts = verify_rows(["7", "The answer is (B).", "so $\\boxed{0.5}$", "9"], rows)
    assert [v.correct for v in verdicts] == [True, True, True, False]
    assert [v.extracted for v in verdicts][:2] == ["7", "B"]


def test_verify_rows_refuses_mismatched_lengths():
    with pytest.raises(SelfImproveError, match="2 completions but 1 rows"):
        verify_rows(["1", "2"], [{"answer": "1"}])


def test_verifier_reward_zips_trl_columns_into_rows():
    # TRL hands every dataset column over as a keyword list, and chat completions as
    # messages: the one reward adapter judges each row with its own verifier.
    rewards = make_verifier_reward()(
        prompts=["q1", "q2"],
        completions=[[{"role": "assistant", "content": "Answer: C"}], "B) library"],
        answer=["C", "B"],
        choices=[CHOICES, CHOICES],
        verifier=["multiple_choice", "multiple_choice"],
    )
    assert rewards == [1.0, 1.0]


def test_numeric_row_without_answer_is_an_error():
    with pytest.raises(SelfImproveError, match="without an `answer`"):
        verify_row("4", {"prompt": "2 + 2?"})


# --- multiple choice ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        ("The answer is (B).", "B"),
        ("Answer: B", "B"),
        ("B) library", "B"),
        ("B. library", "B"),
        ("**B**", "B"),
        ("(B)", "B"),
        ("library", "B"),  # the option text alone
        ("People borrow books at a library.", "B"),
        ("A bank is busy, but the answer is D", "D"),  # the answer phrase beats the text
        ("I think it is a department store", "C"),  # the longer option text
        ("Let me think.\nC. department store", "C"),
        ("$\\boxed{E}$", "E"),
        ('B. library\nThe answer is "E".', "E"),  # quoted label in the answer phrase
        ("A. bank\nB. library\nC. department store", None),  # it listed the options
        ("a bank or a mall", None),  # two options named: no choice
        ("I don't know", None),
    ],
)
def test_multiple_choice_extraction(reply, label):
    assert mc.extract_choice(reply, CHOICES) == label
    verdict = verify_row(reply, CSQA_ROW)
    assert verdict.extracted == label
    assert verdict.correct == (label == "B")
    assert verdict.reason == (
        "no_answer" if label is None else "correct" if label == "B" else "wrong_answer"
    )


def test_multiple_choice_choices_may_be_the_tables_json_column():
    row = {"answer": "B", "choices": json.dumps(CHOICES), "verifier": "multiple_choice"}
    assert verify_row("Answer: B", row).correct
    assert verify_rows(["library", "bank"], [row, row])[0].correct


def test_multiple_choice_reference_may_be_the_choice_text_or_a_list():
    row = {"answer": "library", "choices": ["bank", "library"], "verifier": "multiple_choice"}
    assert verify_row("Answer: B", row).correct


def test_multiple_choice_bad_reference_is_an_error():
    with pytest.raises(SelfImproveError, match="neither a label nor a choice text"):
        verify_row("B", {**CSQA_ROW, "answer": "Z"})
    with pytest.raises(SelfImproveError, match="at least two choices"):
        verify_row("B", {"answer": "A", "choices": {"A": "x"}, "verifier": "multiple_choice"})


def test_multiple_choice_frame_agrees_with_rows_on_real_dev_set():
    rows = [json.loads(line) for line in (SHARED_DATA / "commonsenseqa/dev.jsonl").open()][:200]
    rng = random.Random(0)
    replies = []
    for row in rows:
        label = rng.choice("ABCDE")
        replies.append(
            rng.choice(
                [
                    f"The answer is ({label}).",
                    f"{label}) {row['choices'][label]}",
                    row["choices"][label],
                    f"Because ... so {row['choices'][label]} it is",
                    "no idea",
                ]
            )
        )
    problem_rows = [{**r, "verifier": "multiple_choice"} for r in rows]
    batched = verify_rows(replies, problem_rows)
    single = [mc.verify_row(c, r) for c, r in zip(replies, problem_rows, strict=True)]
    assert batched == single


# --- math ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "answer", "correct"),
    [
        ("The answer is $\\frac{1}{2}$", "0.5", True),
        ("so $\\boxed{\\dfrac{3}{4}}$", "\\frac34", True),
        ("x = 3", "3", True),
        ("The answer is 10 cm", "10", True),  # units stripped
        ("so $\\boxed{[1,3)}$", "[1,3)", True),  # intervals
        ("$\\boxed{(1,3)}$", "[1,3)", False),
        (
            "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
            "\\left( 3, \\frac{\\pi}{2} \\right)",
            True,
        ),
        ("Answer: 7", "3", False),
    ],
)
def test_math_equivalence(reply, answer, correct):
    assert verify_row(reply, {"answer": answer, "verifier": "math"}).correct is correct


def test_math_no_answer_and_bad_reference():
    assert verify_row("   ", {"answer": "3", "verifier": "math"}).reason == "no_answer"
    with pytest.raises(SelfImproveError, match="without an `answer`"):
        verify_row("3", {"answer": "", "verifier": "math"})


def test_math_reasoning_without_a_final_answer_is_no_answer():
    # A rationale cut off by the token limit (a real SmolLM2 sample on MATH-500): its
    # last expression is a list marker, not an answer.
    cut_off = "1. IMO gold will always be first.\n5. From row I, we pick two.\n6. From row II, we"
    row = {"answer": "6", "verifier": "math"}
    assert verify_row(cut_off, row).reason == "no_answer"
    assert verify_row(cut_off + " can pick 6.\nThe answer is 6", row).correct
    assert verify_row("$6$", row).correct  # a one-line reply is its own answer


def test_math_accepts_every_math500_reference_solution():
    rows = [json.loads(line) for line in (SHARED_DATA / "math500/test.jsonl").open()][:60]
    verdicts = verify_rows([r["solution"] for r in rows], [{**r, "verifier": "math"} for r in rows])
    assert all(v.correct for v in verdicts), [v for v in verdicts if not v.correct][:3]


# --- custom ------------------------------------------------------------------------


def exact_text(completion, row):
    """A custom verifier for the tests below (module:function = tests.test_verifiers:exact_text)."""
    return completion.strip() == row["answer"]


def test_custom_verifier_by_module_function():
    row = {"answer": "yes", "verifier": "tests.test_verifiers:exact_text"}
    assert verify_rows(["yes", "no"], [row, row]) == [
        Verdict(True, None, "correct"),
        Verdict(False, None, "wrong_answer"),
    ]


def test_custom_verifier_errors_name_the_fix():
    with pytest.raises(SelfImproveError, match="cannot import module 'no_such_module'"):
        verify_row("x", {"answer": "x", "verifier": "no_such_module:f"})
    with pytest.raises(SelfImproveError, match="has no function 'nope'"):
        verify_row("x", {"answer": "x", "verifier": "tests.test_verifiers:nope"})
    sys.modules[__name__].returns_text = lambda completion, row: "yes"  # type: ignore[attr-defined]
    with pytest.raises(SelfImproveError, match="return a Verdict, a bool"):
        verify_row("x", {"answer": "x", "verifier": "tests.test_verifiers:returns_text"})


# --- vectorized numeric ----------------------------------------------------------------

# Pieces of replies: the cascade's markers, numbers in every shape the Python path
# handles specially (thousands, signs, decimals, Unicode minus), and words.
_PIECES = [
    "The answer is",
    "Answer:",
    "=",
    "####",
    "\\boxed{",
    "}",
    " ",
    "\n",
    "-",
    "$",
    ",",
    ".",
    "(",
    ")",
    "**",
    "apples",
    "is",
    "%",
    "answer",
    "0",
    "7",
    "12",
    "3.50",
    "1,234",
    "1,2",
    "\u22125",
    "57.0",
    "007",
    "+",
    "about",
    "\u00a0",
    "\r",
    "12345678901234567890",
]


def test_numeric_frame_reference_must_be_a_number():
    frame = pl.DataFrame({"completion": ["1"], "answer": ["abc"]})
    with pytest.raises(SelfImproveError, match="is not a number"):
        numeric.verify_frame(frame)
