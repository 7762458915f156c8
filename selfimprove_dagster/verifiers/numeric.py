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
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import polars as pl

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.verifiers.verdict import Verdict

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


def verify_row(completion: str, row: Mapping[str, Any]) -> Verdict:
    """`verify` for a problem row (the dispatcher's interface): reads `row["answer"]`."""
    if row.get("answer") is None:
        raise SelfImproveError(
            "the numeric verifier got a row without an `answer`",
            "give every problem row a reference answer in an `answer` column",
        )
    return verify(completion, str(row["answer"]))


def verify_rows(completions: list[str], rows: list[Mapping[str, Any]]) -> list[Verdict]:
    """`verify_row` over a batch, through the vectorized `verify_frame`."""
    for row in rows:
        if row.get("answer") is None:
            verify_row("", row)  # raises the missing-answer error
    frame = pl.DataFrame(
        {"completion": list(completions), "answer": [str(r["answer"]) for r in rows]},
        schema={"completion": pl.String, "answer": pl.String},
    )
    out = verify_frame(frame)
    return [
        Verdict(correct=c, extracted=e, reason=r)
        for c, e, r in zip(out["correct"], out["extracted"], out["reason"], strict=True)
    ]


# --- the same verifier as Polars expressions ----------------------------------------
#
# Polars uses Rust's regex engine: no lookbehind or lookahead. Without them the patterns
# above differ from Python's in a few rare cases, which `verify_frame` hands back to the
# Python path row by row:
# - a thousands group followed by a digit ("1,2345": Python's `(?!\d)` lookahead makes
#   it "1", the Rust pattern would read "1,234"). Without ",dddd" anywhere in the text
#   every ",ddd" run ends before a non-digit, the lookahead always holds and both
#   engines read the same number, so "1,234" is decided here;
# - a negative candidate (the sign rule of `_matched_number` looks at the text before
#   it);
# - long numbers (`_canonical` and `_same_number` use Decimal arithmetic, which rounds
#   to 28 significant digits).
_V_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
_V_NUM = rf"-?\$?\s?{_V_DIGITS}(?:\.\d+)?"
_V_LEAD = r"[\s*$\\({\[]*"
_V_GSM8K = rf"####\s*({_V_NUM})"
_V_BOXED = r"\\boxed\s*\{([^{}]*)\}"
_V_ANSWER = (
    r"(?i)\banswer\b"
    r"(?:\s+(?:is|was|would\s+be|will\s+be|should\s+be))?"
    r"\s*[:=]?\s*"
    r"(?:(?:approximately|about|exactly|simply|just|equal\s+to)\s+)?"
    rf"{_V_LEAD}({_V_NUM})"
)
_V_EQUALS = rf"=\s*{_V_LEAD}({_V_NUM})"
_V_TAIL = rf"({_V_NUM})$"
_V_LAST_NUMBER = rf"(?:^|[^\w.])({_V_NUM})"
# The first non-blank line is a bare number: `[^\S\n]` is whitespace within the line.
_V_SP = r"[^\S\n]"
_V_FIRST_LINE = (
    rf"^\s*(?:{_V_SP}|[*$\\({{\[])*(-?\$?{_V_SP}?{_V_DIGITS}(?:\.\d+)?)"
    rf"{_V_SP}*[*$\\)}}\]]*{_V_SP}*%?{_V_SP}*[.!]?{_V_SP}*(?:\n|$)"
)
# Rows the expressions leave to Python: see above (a run of 16 digits, dots and commas
# is a number that may have more than 15 significant digits); plus the Unicode minus
# and no-break space (`_clean` rewrites them) and line breaks other than "\n"
# (`str.splitlines` splits on them, the first-line regex does not).
_V_DEFER = r",\d{4}|[\u2212\u00a0\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]|[\d.,]{16,}"
# A reference answer that is a plain number of at most 25 digits: `normalize_number`
# returns `_canonical` of the whole string, which `with_canonical` computes exactly
# (Decimal rounds only beyond 28 digits). Other references go through Python.
_V_PLAIN_REFERENCE = r"^-?\d{1,15}(?:\.\d{1,10})?$"

Frame = pl.DataFrame | pl.LazyFrame


def with_raw_answer(
    frame: pl.DataFrame, completion: str, target: str, **extra: pl.Expr
) -> pl.DataFrame:
    """`frame` plus column `target`: the number `extract_answer` picks, not yet canonical
    (it may keep one leading non-number character, which `with_canonical` drops), and
    the `extra` columns, computed in the same pass as the finders' literal tests.

    The finders run in `extract_answer`'s order, each only on the rows no earlier finder
    answered and for which a cheap literal test says it can match: those rows are
    gathered, searched, and their answers scattered back, so most rows pay for one
    regex and no finder touches the other rows (masking them as nulls instead still
    costs several passes over the whole column per finder).
    """
    text = pl.col(completion)
    flags = frame.select(
        _gsm=text.str.contains("####", literal=True),
        _box=text.str.contains("\\boxed", literal=True),
        _ans=text.str.contains(r"(?i)answer"),
        _eq=text.str.contains("=", literal=True),
        **extra,
    )
    finders = {
        "_gsm": lambda t: _v_last(t, _V_GSM8K),
        "_box": lambda t: (
            t.str.extract(r"(?s)^.*" + _V_BOXED, 1).str.extract_all(_V_LAST_NUMBER).list.last()
        ),
        "_ans": lambda t: _v_last(t, _V_ANSWER),
        "_eq": lambda t: _v_last(t, _V_EQUALS),
        "_first": lambda t: t.str.extract(_V_FIRST_LINE, 1),
        "_last": lambda t: t.str.extract_all(_V_LAST_NUMBER).list.last(),
    }
    texts = frame[completion]
    raw = pl.repeat(None, frame.height, dtype=pl.String, eager=True)
    open_ = pl.repeat(True, frame.height, dtype=pl.Boolean, eager=True)  # no answer yet
    for name, finder in finders.items():
        rows = (open_ & flags[name] if name in flags.columns else open_).arg_true()
        if not len(rows):
            continue
        found = texts.gather(rows).to_frame("t").select(finder(pl.col("t"))).to_series()
        hit = found.is_not_null()
        raw = raw.scatter(rows.filter(hit), found.filter(hit))
        open_ = open_.scatter(rows.filter(hit), False)
    return frame.with_columns(*(flags[name] for name in extra), raw.alias(target))


def with_canonical(frame: Frame, source: str, target: str) -> Frame:
    """`frame` plus column `target`: `_canonical` of `source` ("$1.50" -> "1.5",
    "57.0" -> "57", "007" -> "7") after dropping a leading character that cannot start
    a number ("(5" -> "5", as `with_raw_answer` leaves it). Built in stages: one nested
    expression would repeat its shared sub-expressions many times over."""
    digits = pl.col("_d")
    magnitude = pl.col("_m")
    staged = (
        frame.lazy()
        # A raw answer may start with the character before its number ("(5", " 5"):
        # dropped here with the spaces, "$" and "," (one regex pass for both).
        .with_columns(_d=pl.col(source).str.replace_all(r"^[^\d$-]|[\s$,]", ""))
        .with_columns(
            _m=pl.when(digits.str.contains(".", literal=True))
            .then(digits.str.strip_chars_end("0").str.strip_chars_end("."))
            .otherwise(digits)
            .str.strip_chars_start("-")
            .str.strip_chars_start("0")
        )
        .with_columns(
            _m=pl.when(magnitude == "")
            .then(pl.lit("0"))
            .when(magnitude.str.starts_with("."))
            .then(pl.concat_str(pl.lit("0"), magnitude))
            .otherwise(magnitude)
        )
        .with_columns(
            pl.when(digits.str.starts_with("-") & (magnitude != "0"))
            .then(pl.concat_str(pl.lit("-"), magnitude))
            .otherwise(magnitude)
            .alias(target)
        )
        .drop("_d", "_m")
    )
    return _like(frame, staged)


def references(answers: pl.Series, strict: bool = True) -> pl.Series:
    """`_reference` of every answer (the canonical reference number), vectorized for
    plain numbers; other answers ("1,234", GSM8K solutions, non-strings) go through
    Python once per distinct value. A non-number raises like `_reference`, or is null
    when not `strict`."""
    if answers.dtype == pl.String:
        plain = pl.when(pl.col("a").str.contains(_V_PLAIN_REFERENCE)).then(pl.col("a"))
        fast = with_canonical(pl.DataFrame({"a": answers}).lazy().select(p=plain), "p", "r")
        out = fast.collect()["r"]
    else:
        out = pl.Series(values=[None] * len(answers), dtype=pl.String)
    rest = answers.filter(out.is_null())
    if len(rest):
        mapping = {a: _reference_or_none(a, strict) for a in rest.unique().to_list()}
        slow = answers.replace_strict(mapping, default=None, return_dtype=pl.String)
        out = pl.select(pl.coalesce(out, slow)).to_series()
    return out.alias("reference")


def _reference_or_none(answer: Any, strict: bool) -> str | None:
    if strict:
        return _reference(answer)
    try:
        return _reference(answer)
    except (SelfImproveError, AttributeError, TypeError):
        return None


def verify_frame(frame: pl.DataFrame, reference: str | None = None) -> pl.DataFrame:
    """Vectorized `verify` for a frame with `completion` and `answer` (reference) columns.

    Returns the frame with `extracted`, `correct` and `reason`, equal to the row-by-row
    `verify` (tests check this on a corpus); the few rows the Rust regexes cannot decide
    (see above) go through `verify` itself. `reference` names a column that already
    holds `references(answer)` (computed once per prompt by the caller).
    """
    out = with_raw_answer(
        frame.with_columns(
            _reference=references(frame["answer"]) if reference is None else pl.col(reference)
        ),
        "completion",
        "_raw",
        _defer=pl.col("completion").str.contains(_V_DEFER),
    )
    out = with_canonical(out.lazy(), "_raw", "extracted")
    extracted, ref = pl.col("extracted"), pl.col("_reference")
    # Canonical strings are equal exactly when the numbers are. Two different numbers
    # with at most 5 decimals each differ by at least 1e-5 > TOLERANCE: wrong. Only a
    # pair where one has 6 or more decimals may be within the tolerance; Python decides.
    out = out.with_columns(
        correct=extracted.is_not_null() & (extracted == ref).fill_null(False),
        _defer=pl.col("_defer")
        | extracted.str.starts_with("-").fill_null(False)
        | ((extracted != ref) & (_many_decimals(extracted) | _many_decimals(ref))).fill_null(False),
    ).with_columns(
        reason=pl.when(extracted.is_null())
        .then(pl.lit("no_answer"))
        .when(pl.col("correct"))
        .then(pl.lit("correct"))
        .otherwise(pl.lit("wrong_answer"))
    )
    judged = out.drop("_raw", "_reference").collect(engine="streaming")
    deferred = judged["_defer"].arg_true()
    if len(deferred):
        judged = _verify_deferred(judged, deferred)
    return judged.drop("_defer")


def _like(frame: Frame, staged: pl.LazyFrame) -> Frame:
    # The helpers take either kind of frame and give back the same kind.
    return staged.collect(engine="streaming") if isinstance(frame, pl.DataFrame) else staged


def _many_decimals(number: pl.Expr) -> pl.Expr:
    return number.str.len_bytes() - number.str.find(".", literal=True) > 6


def _v_last(text: pl.Expr, pattern: str) -> pl.Expr:
    # The last of the non-overlapping matches (Python's `finditer` order), then the
    # number that ends it: every finder pattern ends in its number.
    return text.str.extract_all(pattern).list.last().str.extract(_V_TAIL, 1)


def _verify_deferred(out: pl.DataFrame, rows: pl.Series) -> pl.DataFrame:
    completions = out["completion"].gather(rows).to_list()
    answers = out["answer"].gather(rows).to_list()
    verdicts = [verify(c, a) for c, a in zip(completions, answers, strict=True)]
    return out.with_columns(
        out["extracted"].scatter(rows, [v.extracted for v in verdicts]),
        out["correct"].scatter(rows, [v.correct for v in verdicts]),
        out["reason"].scatter(rows, [v.reason for v in verdicts]),
    )
