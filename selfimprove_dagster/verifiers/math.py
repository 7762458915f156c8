"""The verifier for math answers (MATH-500 and any row with a LaTeX answer).

Equivalence is decided by `math-verify` (Hugging Face; it parses LaTeX and plain
expressions with latex2sympy2-extended and compares with sympy): fractions and
decimals ("\\frac{1}{2}" = "0.5"), LaTeX forms ("\\dfrac", "\\left(" ...), units and
"\\text{}" stripped, sets and intervals, equations ("x = 3" against "3"). No
hand-written string rules here: this module only picks the final answer out of a
reply and hands both sides to the library.

The final answer is, in order: the last `\\boxed{...}`, the text after the last
"answer is" / "Answer:", or the whole reply (math-verify then takes its last
expression). The reference is parsed the same way, wrapped in `$...$` when it is bare
LaTeX so "\\frac{1}{2}" parses as a fraction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.verifiers.verdict import Verdict

# Seconds math-verify may spend on one parse or comparison (sympy can hang on huge
# expressions); it enforces this with a signal alarm, so only in the main thread.
TIMEOUT_SECONDS = 5

_ANSWER_LINE_RE = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:)\s*(?P<body>[^\n]+)", re.IGNORECASE
)


def verify_row(completion: str, row: Mapping[str, Any]) -> Verdict:
    """Whether the reply's final answer equals `row["answer"]` mathematically."""
    if row.get("answer") is None or not str(row["answer"]).strip():
        raise SelfImproveError(
            "the math verifier got a row without an `answer`",
            "give every problem row its final answer (LaTeX or plain, e.g. '\\frac{1}{2}')",
        )
    return verify(completion, str(row["answer"]))


def verify(completion: str, answer: str) -> Verdict:
    """Whether `completion` states `answer` (LaTeX or plain) up to equivalence."""
    from math_verify import verify as equivalent

    gold = _parse_reference(answer)
    if not gold:
        raise SelfImproveError(
            f"math reference answer {answer!r} does not parse",
            "write the answer as LaTeX (e.g. '\\frac{1}{2}', '(3, \\frac{\\pi}{2})') or a number",
        )
    final = final_answer_text(completion)
    predicted = _parse(final) if final else []
    if not predicted:
        return Verdict(correct=False, extracted=None, reason="no_answer")
    extracted = str(predicted[-1])
    try:
        same = equivalent(gold, predicted, timeout_seconds=_timeout())
    except Exception as err:  # sympy errors on exotic input: a wrong answer, not a crash
        return Verdict(
            correct=False, extracted=extracted, reason=f"wrong_answer: {type(err).__name__}"
        )
    return Verdict(
        correct=bool(same), extracted=extracted, reason="correct" if same else "wrong_answer"
    )


# A reply without a boxed answer or an "answer is" line counts as the answer itself
# only when it is one line of at most this many characters.
MAX_BARE_ANSWER_CHARS = 80


def final_answer_text(completion: str) -> str | None:
    """The part of a reply holding its final answer: the last \\boxed{...}, else the rest
    of the last "answer is ..." line, else the whole reply when it is one short line
    (the reply is the answer); None otherwise. Why not the last expression of any
    reply: reasoning cut off by the token limit ends in whatever it was writing, and
    on MATH-500 a truncated "...\n6. From row II, we can pick" was read as the answer 6."""
    boxed = _last_boxed(completion)
    if boxed is not None:
        return f"$\\boxed{{{boxed}}}$"
    lines = list(_ANSWER_LINE_RE.finditer(completion))
    if lines:
        return lines[-1].group("body").strip()
    reply = completion.strip()
    return reply if reply and "\n" not in reply and len(reply) <= MAX_BARE_ANSWER_CHARS else None


# --- helpers ---------------------------------------------------------------------


def _timeout() -> int | None:
    # math-verify's timeout uses SIGALRM, which works only in the main thread.
    import threading

    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def _parse(text: str) -> list:
    from math_verify import parse

    try:
        return parse(text, parsing_timeout=_timeout())
    except Exception:  # an unparsable reply is a reply without an answer
        return []


@lru_cache(maxsize=4096)
def _parse_reference_cached(answer: str) -> tuple:
    # A bare reference reads best as the body of a box; try the plainer forms after.
    text = answer.strip()
    for form in (f"$\\boxed{{{text}}}$", f"${text}$", text):
        parsed = _parse(form)
        if parsed:
            return tuple(parsed)
    return ()


def _parse_reference(answer: str) -> list:
    return list(_parse_reference_cached(answer))


def _last_boxed(text: str) -> str | None:
    """Body of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_at = text.find("{", start)
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None
