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
# above differ from Python's in three rare cases, which `verify_frame` hands back to the
# Python path row by row: thousands separators ("1,234", the `(?!\d)` lookahead), a
# negative candidate (the sign rule of `_matched_number` looks at the text before it),
# and very long numbers (compared exactly as Decimals, not as floats).
_V_NUM = r"-?\$?\s?\d+(?:\.\d+)?"
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
    rf"^\s*(?:{_V_SP}|[*$\\({{\[])*(-?\$?{_V_SP}?\d+(?:\.\d+)?)"
    rf"{_V_SP}*[*$\\)}}\]]*{_V_SP}*%?{_V_SP}*[.!]?{_V_SP}*(?:\n|$)"
)
# Rows the expressions leave to Python: see above; plus line breaks other than "\n"
# (`str.splitlines` splits on them, the first-line regex does not).
_V_DEFER = r"\d,\d|[\u2212\u00a0\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]|\d{16,}"


def with_raw_answer(frame: pl.DataFrame, completion: str, target: str) -> pl.DataFrame:
    """`frame` plus column `target`: the number `extract_answer` picks, not yet canonical.

    The finders run in `extract_answer`'s order, each only on the rows that need it:
    a finder's regex sees a row only when a cheap literal test says it can match and no
    earlier finder matched (null rows cost nothing), so most rows pay for one regex.
    """
    text = pl.col(completion)
    flagged = frame.select(
        _c=text,
        _gsm=text.str.contains("####", literal=True),
        _box=text.str.contains("\\boxed", literal=True),
        _ans=text.str.contains(r"(?i)answer"),
        _eq=text.str.contains("=", literal=True),
    )
    staged = flagged.with_columns(
        _r=pl.coalesce(
            _v_last(pl.when(pl.col("_gsm")).then(pl.col("_c")), _V_GSM8K),
            pl.when(pl.col("_box"))
            .then(pl.col("_c"))
            .str.extract(r"(?s)^.*" + _V_BOXED, 1)
            .str.extract_all(_V_LAST_NUMBER)
            .list.last(),
            _v_last(pl.when(pl.col("_ans")).then(pl.col("_c")), _V_ANSWER),
            _v_last(pl.when(pl.col("_eq")).then(pl.col("_c")), _V_EQUALS),
        )
    )
    staged = staged.with_columns(
        _r=pl.coalesce(
            pl.col("_r"),
            pl.when(pl.col("_r").is_null()).then(pl.col("_c")).str.extract(_V_FIRST_LINE, 1),
        )
    )
    staged = staged.with_columns(
        _r=pl.coalesce(
            pl.col("_r"),
            pl.when(pl.col("_r").is_null())
            .then(pl.col("_c"))
            .str.extract_all(_V_LAST_NUMBER)
            .list.last(),
        )
    )
    return frame.with_columns(staged["_r"].str.replace(r"^[^\d$-]", "").alias(target))


def with_canonical(frame: pl.DataFrame, source: str, target: str) -> pl.DataFrame:
    """`frame` plus column `target`: `_canonical` of `source` ("$1.50" -> "1.5",
    "57.0" -> "57", "007" -> "7"). Built in stages: one nested expression would repeat
    its shared sub-expressions many times over."""
    digits = frame.select(pl.col(source).str.replace_all(r"[\s$,]", "").alias("d"))["d"]
    magnitude = (
        pl.when(pl.col("d").str.contains(".", literal=True))
        .then(pl.col("d").str.strip_chars_end("0").str.strip_chars_end("."))
        .otherwise(pl.col("d"))
        .str.strip_chars_start("-")
        .str.strip_chars_start("0")
    )
    staged = (
        pl.DataFrame({"d": digits})
        .with_columns(m=magnitude)
        .with_columns(
            m=pl.when(pl.col("m") == "")
            .then(pl.lit("0"))
            .when(pl.col("m").str.starts_with("."))
            .then(pl.concat_str(pl.lit("0"), pl.col("m")))
            .otherwise(pl.col("m"))
        )
    )
    negative = pl.col("d").str.starts_with("-") & (pl.col("m") != "0")
    value = staged.select(
        pl.when(pl.col("d").is_null())
        .then(pl.lit(None, dtype=pl.String))
        .when(negative)
        .then(pl.concat_str(pl.lit("-"), pl.col("m")))
        .otherwise(pl.col("m"))
        .alias(target)
    )[target]
    return frame.with_columns(value)


def verify_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """Vectorized `verify` for a frame with `completion` and `answer` (reference) columns.

    Returns the frame with `extracted`, `correct` and `reason`, equal to the row-by-row
    `verify` (tests check this on a corpus); the few rows the Rust regexes cannot decide
    (see above) go through `verify` itself.
    """
    references = _references(frame["answer"])
    out = frame.with_columns(
        _reference=references,
        _defer=pl.col("completion").str.contains(_V_DEFER),
    )
    out = with_raw_answer(out, "completion", "_raw")
    out = with_canonical(out, "_raw", "extracted").drop("_raw")
    out = out.with_columns(
        _defer=pl.col("_defer") | pl.col("extracted").str.starts_with("-").fill_null(False)
    )
    difference = (
        pl.col("extracted").cast(pl.Float64, strict=False)
        - pl.col("_reference").cast(pl.Float64, strict=False)
    ).abs()
    same = (pl.col("extracted") == pl.col("_reference")) | (difference <= float(TOLERANCE))
    out = out.with_columns(
        correct=pl.col("extracted").is_not_null() & same.fill_null(False),
    ).with_columns(
        reason=pl.when(pl.col("extracted").is_null())
        .then(pl.lit("no_answer"))
        .when(pl.col("correct"))
        .then(pl.lit("correct"))
        .otherwise(pl.lit("wrong_answer"))
    )
    deferred = out["_defer"].arg_true()
    if len(deferred):
        out = _verify_deferred(out, deferred)
    return out.drop("_reference", "_defer")


def _v_last(text: pl.Expr, pattern: str) -> pl.Expr:
    # The last of the non-overlapping matches (Python's `finditer` order), then the
    # number that ends it: every finder pattern ends in its number.
    return text.str.extract_all(pattern).list.last().str.extract(_V_TAIL, 1)


def _references(answers: pl.Series) -> pl.Series:
    # References repeat (k samples per prompt): normalize each distinct one once.
    unique = answers.unique()
    mapping = {a: _reference(a) for a in unique.to_list()}
    return answers.replace_strict(mapping, return_dtype=pl.String)


def _verify_deferred(out: pl.DataFrame, rows: pl.Series) -> pl.DataFrame:
    completions = out["completion"].gather(rows).to_list()
    answers = out["answer"].gather(rows).to_list()
    verdicts = [verify(c, a) for c, a in zip(completions, answers, strict=True)]
    patch = pl.DataFrame(
        {
            "_row": rows,
            "_x": [v.extracted for v in verdicts],
            "_c": [v.correct for v in verdicts],
            "_r": [v.reason for v in verdicts],
        },
        schema={"_row": rows.dtype, "_x": pl.String, "_c": pl.Boolean, "_r": pl.String},
    )
    joined = out.with_row_index("_row").join(patch, on="_row", how="left")
    return joined.with_columns(
        extracted=pl.when(pl.col("_defer")).then(pl.col("_x")).otherwise(pl.col("extracted")),
        correct=pl.when(pl.col("_defer")).then(pl.col("_c")).otherwise(pl.col("correct")),
        reason=pl.when(pl.col("_defer")).then(pl.col("_r")).otherwise(pl.col("reason")),
    ).drop("_row", "_x", "_c", "_r")
