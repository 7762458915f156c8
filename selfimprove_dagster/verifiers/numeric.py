"""Answer extraction and the verifier for numeric answers.

A small chat model (SmolLM2-135M) rarely writes a clean "Answer: N". This module
pulls the most likely final number out of what it did write, normalizes it to a
canonical string ("1,234" -> "1234", "57.0" -> "57", "1.50" -> "1.5") and compares it
with the reference answer. Pure Python, so the verifier runs anywhere (assets, checks,
TRL reward functions) without torch.

    >>> verify("71 + 55 = 126\\n\\nThis is a classic 2-digit problem", "126").correct
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from selfimprove_dagster.errors import SelfImproveError

# Two numbers closer than this are the same answer (covers "0.1 + 0.2" style noise).
TOLERANCE = Decimal("1e-6")

# One number as people and models write it: optional sign, optional currency sign,
# thousands separators only in groups of three ("1,234" but not the list "3,4"),
# optional decimals. Whether a "-" is a sign or a binary minus is decided in
# `_matched_number` (a regex lookbehind cannot skip the spaces in "10 - 3").
_NUMBER = (
    r"-?\$?\s?"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"(?:\.\d+)?"
)
_NUMBER_RE = re.compile(rf"(?<![\w.])(?P<num>{_NUMBER})")

# Decoration a reply may wrap its number in: markdown bold, LaTeX, currency, brackets.
_LEAD = r"[\s*$\\({\[]*"

_GSM8K_RE = re.compile(rf"####\s*(?P<num>{_NUMBER})")
_BOXED_RE = re.compile(r"\\boxed\s*\{(?P<body>[^{}]*)\}")
_ANSWER_RE = re.compile(
    r"\banswer\b"
    r"(?:\s+(?:is|was|would\s+be|will\s+be|should\s+be))?"
    r"\s*[:=]?\s*"
    r"(?:(?:approximately|about|exactly|simply|just|equal\s+to)\s+)?"
    rf"{_LEAD}(?P<num>{_NUMBER})",
    re.IGNORECASE,
)
_EQUALS_RE = re.compile(rf"=\s*{_LEAD}(?P<num>{_NUMBER})")

# A whole string that is one number, maybe with currency, percent, or a final period.
_BARE_NUMBER_RE = re.compile(rf"^\s*{_LEAD}(?P<num>{_NUMBER})\s*[*$\\)}}\]]*\s*%?\s*[.!]?\s*$")


def normalize_number(text: str | float) -> str | None:
    """Canonical string of a value that is exactly one number, else None.

    Accepts ints and floats (dataset answers stored as numbers) and strings such as
    "1,234", "$12", "57.0", " -3 ", "1.50", "50%", "42.". Strings with words around
    the number ("12 apples") are not numbers: use `extract_answer` for free text.
    """
    if isinstance(text, bool):  # bool is an int subclass; True is not an answer
        return None
    if isinstance(text, int | float):
        text = repr(text)
    match = _BARE_NUMBER_RE.match(_clean(text))
    return _canonical(match.group("num")) if match else None


def extract_answer(text: str) -> str | None:
    """The final numeric answer in a model's reply, normalized; None if it has no number.

    Tries, in order: GSM8K's "#### N", "\\boxed{N}", the last "answer is N" /
    "Answer: N", the last "= N", a first line that is just a number, and finally the
    last number anywhere in the text.
    """
    text = _clean(text)
    for finder in (_last_gsm8k, _last_boxed, _last_answer_phrase, _last_equals, _first_line):
        found = finder(text)
        if found is not None:
            return found
    return _last_number(text)


@dataclass(frozen=True)
class Verdict:
    """The verifier's decision on one completion."""

    correct: bool
    extracted: str | None  # the normalized number found in the completion, if any
    reason: str  # "correct", "wrong_answer" or "no_answer"


def verify(completion: str, answer: str) -> Verdict:
    """Whether `completion` states the reference `answer` (numbers compared within 1e-6).

    `answer` may be a bare number ("1,234") or a GSM8K solution ending in "#### N".
    """
    reference = _reference(answer)
    extracted = extract_answer(completion)
    if extracted is None:
        return Verdict(correct=False, extracted=None, reason="no_answer")
    if _same_number(extracted, reference):
        return Verdict(correct=True, extracted=extracted, reason="correct")
    return Verdict(correct=False, extracted=extracted, reason="wrong_answer")


def ground_truth(completion: str, reference: object | None) -> bool | None:
    """Whether `completion` is right, or None for a prompt without a reference answer
    (critics that need no labels still record correctness where it is known)."""
    return None if reference is None else verify(completion, str(reference)).correct


def correctness_reward(
    completions: list[str], answers: list[str] | None = None, **kwargs: object
) -> list[float]:
    """TRL-style reward: 1.0 for each completion whose answer is right, else 0.0.

    TRL passes dataset columns as keyword arguments named after the column, so a
    problem table's `answer` column arrives as `answer=`; `answers=` works too.
    Conversational completions (lists of chat messages) are scored on the last message.
    """
    if answers is None:
        answers = kwargs.get("answer")  # type: ignore[assignment]
    if answers is None:
        raise SelfImproveError(
            "correctness_reward got no reference answers",
            "pass `answers=[...]` or keep an `answer` column in the training dataset",
        )
    if len(answers) != len(completions):
        raise SelfImproveError(
            f"correctness_reward got {len(completions)} completions but {len(answers)} answers",
            "pass one reference answer per completion, in the same order",
        )
    return [
        1.0 if verify(_completion_text(c), str(a)).correct else 0.0
        for c, a in zip(completions, answers, strict=True)
    ]


# --- helpers ---------------------------------------------------------------------


def _clean(text: str) -> str:
    # Models emit the Unicode minus and non-breaking spaces; treat them as ASCII.
    return text.replace("\u2212", "-").replace("\u00a0", " ")


def _canonical(number: str) -> str | None:
    digits = re.sub(r"[\s$,]", "", number)
    try:
        value = Decimal(digits)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))  # "57.0" -> "57", "-0" -> "0"
    return format(value.normalize(), "f")  # "1.50" -> "1.5", never "1E+1"


def _last_match(pattern: re.Pattern[str], text: str) -> str | None:
    matches = list(pattern.finditer(text))
    return _matched_number(matches[-1], text) if matches else None


def _matched_number(match: re.Match[str], text: str) -> str | None:
    number = match.group("num")
    before = text[: match.start("num")].rstrip()
    # After a digit or a closing bracket "-" is subtraction: "10 - 3" ends in 3, not -3.
    if number.startswith("-") and before[-1:] in set("0123456789)]"):
        number = number[1:]
    return _canonical(number)


def _last_gsm8k(text: str) -> str | None:
    return _last_match(_GSM8K_RE, text)


def _last_boxed(text: str) -> str | None:
    boxes = _BOXED_RE.findall(text)
    return _last_number(boxes[-1]) if boxes else None


def _last_answer_phrase(text: str) -> str | None:
    return _last_match(_ANSWER_RE, text)


def _last_equals(text: str) -> str | None:
    return _last_match(_EQUALS_RE, text)


def _first_line(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.strip()]
    return normalize_number(lines[0]) if lines else None


def _last_number(text: str) -> str | None:
    return _last_match(_NUMBER_RE, text)


def _reference(answer: str) -> str:
    # A GSM8K-style solution ("... #### 18") is accepted as a reference, too.
    reference = normalize_number(answer)
    if reference is None and "####" in str(answer):
        reference = _last_gsm8k(_clean(str(answer)))
    if reference is None:
        raise SelfImproveError(
            f"reference answer {answer!r} is not a number",
            "give numeric reference answers (e.g. '42', '1,234', or a solution ending in '#### N')",
        )
    return reference


def _same_number(a: str, b: str) -> bool:
    if a == b:
        return True
    return abs(Decimal(a) - Decimal(b)) <= TOLERANCE


def _completion_text(completion: object) -> str:
    # TRL hands conversational completions over as [{"role": ..., "content": ...}, ...].
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)
