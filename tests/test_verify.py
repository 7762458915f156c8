"""Answer extraction, normalization and the numeric verifier (pure functions)."""

from __future__ import annotations

import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.verifiers.numeric import (
    Verdict,
    extract_answer,
    normalize_number,
    verify,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Replies SmolLM2-135M actually wrote.
        ("122", "122"),
        ("15 + 43 = 50\n\nThis is a classic", "50"),
        ("71 + 55 = 126\n\nThis is a classic 2-digit problem", "126"),  # last "=", not "2"
        ("The sum of 45 and 37 is 82.", "82"),
        ("To add 59 and 63, we need to combine the numbers", "63"),  # last-number fallback
        # Priority: #### > \boxed > "answer is" > "=" > bare first line > last number.
        ("Step: 2 + 2 = 4\n#### 5", "5"),
        ("5 + 5 = 10 so \\boxed{11}", "11"),
        ("\\boxed{12} and #### 13", "13"),
        ("The answer is 7, since 3 + 4 = 7 and 2 more", "7"),
        ("The final answer is $1,234.", "1234"),
        ("answer: 9\nFirst try was Answer: 8", "8"),  # last answer phrase wins
        ("ANSWER IS **42**", "42"),
        ("So x = **57.0**", "57"),
        ("3 + 4 = 7, then 7 * 2 = 14", "14"),
        ("42\nbecause forty-two is 6 times 7", "42"),  # bare first line beats last number
        ("It costs $12 per item", "12"),
        # Normalization and signs.
        ("Answer: 1.50", "1.5"),
        ("The answer is -3", "-3"),
        ("x = -4", "-4"),
        ("What is 10 - 3", "3"),  # binary minus, not a negative number
        ("The temperature is \u221212 degrees", "-12"),  # Unicode minus
        ("#### 1,450,000", "1450000"),
        # No number at all.
        ("I don't know", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1,234", "1234"),
        ("57.0", "57"),
        ("-3", "-3"),
        ("$12", "12"),
        ("1.50", "1.5"),
        (" 42. ", "42"),
        ("50%", "50"),
        ("-0", "0"),
        (57.0, "57"),
        (3, "3"),
        (0.25, "0.25"),
        ("12 apples", None),  # words around the number: not a bare number
        ("twelve", None),
        ("", None),
        (True, None),  # a bool is not an answer even though it is an int
    ],
)
def test_normalize_number(value: str | float, expected: str | None) -> None:
    assert normalize_number(value) == expected


def test_verdict_correct() -> None:
    assert verify("59 + 63 = 122", "122") == Verdict(True, "122", "correct")


def test_verdict_wrong_answer() -> None:
    assert verify("59 + 63 = 121", "122") == Verdict(False, "121", "wrong_answer")


def test_verdict_no_answer() -> None:
    assert verify("I am not sure.", "122") == Verdict(False, None, "no_answer")


def test_verify_normalizes_reference_and_compares_numbers() -> None:
    assert verify("The answer is 1234", "1,234").correct
    assert verify("The answer is 2.5", "2.50").correct
    assert verify("= 0.3", "0.30000000000000004").correct  # within 1e-6
    assert not verify("= 0.31", "0.3").correct


def test_verify_accepts_gsm8k_solution_as_reference() -> None:
    assert verify("So she makes $18.", "9 * 2 = <<9*2=18>>18\n#### 18").correct


def test_verify_rejects_non_numeric_reference() -> None:
    with pytest.raises(SelfImproveError, match="reference answer 'seven' is not a number"):
        verify("7", "seven")
