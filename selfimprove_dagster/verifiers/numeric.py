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
import string
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
    return _find_answer(text)[0]


def verify(completion: str, answer: str, cut_off: bool = False) -> Verdict:
    """Whether `completion` states the reference `answer` (numbers compared within 1e-6).

    `answer` may be a bare number ("1,234") or a GSM8K solution ending in "#### N".
    `cut_off`: the reply stopped at the token limit in a round that asks for reasoning
    and a final "Answer: X" line; a number read from the reasoning (the last "= N", or
    the last number anywhere) is then whatever the reasoning reached when it was cut,
    not an answer (reason `cut_off`). A GSM8K rationale cut off at "... 10:1 (bat +
    ball = 10:1)" was accepted for the reference 10 before "= N" counted here.
    """
    reference = _reference(answer)
    extracted, provisional = _find_answer(completion)
    if extracted is not None and provisional and cut_off:
        return Verdict(correct=False, extracted=None, reason="cut_off")
    if extracted is None:
        return Verdict(correct=False, extracted=None, reason="no_answer")
    if _same_number(extracted, reference):
        return Verdict(correct=True, extracted=extracted, reason="correct")
    return Verdict(correct=False, extracted=extracted, reason="wrong_answer")


def ground_truth(completion: str, reference: object | None) -> bool | None:
    """Whether `completion` is right, or None for a prompt without a reference answer
    (critics that need no labels still record correctness where it is known)."""
    return None if reference is None else verify(completion, str(reference)).correct


# --- helpers ---------------------------------------------------------------------


def _clean(text: str) -> str:
    # Models emit the Unicode minus and non-breaking spaces; treat them as ASCII.
    return text.replace("\u2212", "-").replace("\u00a0", " ")


def _find_answer(text: str) -> tuple[str | None, bool]:
    # `extract_answer`, and whether the answer is provisional: read from reasoning (the
    # last "= N" or the last number) rather than stated as a final answer.
    text = _clean(text)
    for finder in (_last_gsm8k, _last_boxed, _last_answer_phrase, _last_equals, _first_line):
        found = finder(text)
        if found is not None:
            return found, finder is _last_equals
    return _last_number(text), True


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


def verify_row(completion: str, row: Mapping[str, Any]) -> Verdict:
    """`verify` for a problem row (the dispatcher's interface): reads `row["answer"]`
    and `row["cut_off"]` (see `verify`; absent: False)."""
    if row.get("answer") is None:
        raise SelfImproveError(
            "the numeric verifier got a row without an `answer`",
            "give every problem row a reference answer in an `answer` column",
        )
    return verify(completion, str(row["answer"]), bool(row.get("cut_off")))


def verify_rows(completions: list[str], rows: list[Mapping[str, Any]]) -> list[Verdict]:
    """`verify_row` over a batch, through the vectorized `verify_frame`."""
    for row in rows:
        if row.get("answer") is None:
            verify_row("", row)  # raises the missing-answer error
    frame = pl.DataFrame(
        {
            "completion": list(completions),
            "answer": [str(r["answer"]) for r in rows],
            "cut_off": [bool(r.get("cut_off")) for r in rows],
        },
        schema={"completion": pl.String, "answer": pl.String, "cut_off": pl.Boolean},
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
_V_GSM8K = rf"####\s*{_V_NUM}"
_V_BOXED = r"\\boxed\s*\{([^{}]*)\}"
_V_ANSWER = (
    r"(?i)\banswer\b"
    r"(?:\s+(?:is|was|would\s+be|will\s+be|should\s+be))?"
    r"\s*[:=]?\s*"
    r"(?:(?:approximately|about|exactly|simply|just|equal\s+to)\s+)?"
    rf"{_V_LEAD}{_V_NUM}"
)
_V_EQUALS = rf"=\s*{_V_LEAD}{_V_NUM}"
_V_LAST_NUMBER = rf"(?:^|[^\w.]){_V_NUM}"
# The first non-blank line is a bare number: `[^\S\n]` is whitespace within the line.
_V_SP = r"[^\S\n]"
_V_FIRST_LINE = (
    rf"^\s*(?:{_V_SP}|[*$\\({{\[])*-?\$?{_V_SP}?{_V_DIGITS}(?:\.\d+)?"
    rf"{_V_SP}*[*$\\)}}\]]*{_V_SP}*%?{_V_SP}*[.!]?{_V_SP}*(?:\n|$)"
)
# Every character Rust's `\s` matches (Unicode White_Space; a test checks the list).
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
_WHITESPACE += "\u2028\u2029\u202f\u205f\u3000"
# What a finder's match may hold before its number: the keyword ("####", "=", the
# words of the answer phrase, with the case-folded "ſ", "ı" and "İ"), ":", spaces and
# the decoration of `_V_LEAD`. A number starts with "-", "$", a space or a digit, so
# stripping these characters off the match's start leaves the number (maybe without
# its "$" or space, which `_canonical` drops anyway). Taking the matches whole
# (`extract_all`) and stripping them costs a fraction of a capture group.
_KEYWORD_CHARS = string.ascii_letters + "\u017f\u0131\u0130#:=*$\\({[" + _WHITESPACE
# The first line's match is the number between the decoration (`_V_LEAD`'s characters
# before it; `*$\)}]`, "%", "." or "!" after it) and whitespace.
_LINE_START_CHARS = "*$\\({[" + _WHITESPACE
_LINE_END_CHARS = "*$\\)}]%.!" + _WHITESPACE
# Rows the expressions leave to Python: see above (a run of 16 digits, dots and commas
# is a number that may have more than 15 significant digits); plus the Unicode minus
# and no-break space (`_clean` rewrites them), line breaks other than "\n"
# (`str.splitlines` splits on them, the first-line regex does not), "\x1f" (Python's
# `\s` matches it, Rust's does not), the dotted and dotless i (Python's `(?i)i`
# matches them, Rust's does not) and digits other than 0-9 (`Decimal` reads "\u0663"
# as 3, the string comparison does not).
_V_DEFER = (
    r",\d{4}|[\u2212\u00a0\r\x0b\x0c\x1c-\x1f\x85\u2028\u2029\u0130\u0131]|[\d.,]{16,}"
    r"|[\p{Nd}--0-9]"
)
# A reference answer that is a plain number of at most 25 digits: `normalize_number`
# returns `_canonical` of the whole string, which `_canonical_stages` computes exactly
# (Decimal rounds only beyond 28 digits). Other references go through Python.
_V_PLAIN_REFERENCE = r"^-?\d{1,15}(?:\.\d{1,10})?$"
# A raw answer that is a whole number without leading zeros, maybe after the one
# character before it that the last-number finder keeps: canonical as it stands
# (without that character). Most answers are; the others go through the stages.
_V_PLAIN_RAW = r"^[^\d$\-]?[1-9][0-9]*$"


def raw_answers(completions: pl.Series) -> tuple[pl.Series, pl.Series]:
    """(raw, provisional): the number `extract_answer` picks from each completion, not
    yet canonical (it may keep one character before the number, "$" or spaces, which
    `canonical_answers` drops), and whether it was read from reasoning (the "= N" or
    the last-number finder) rather than stated as a final answer.

    The finders run in `extract_answer`'s order, each only on the rows no earlier finder
    answered and for which a cheap literal test says it can match: those rows are
    gathered, searched, and their answers scattered back, so most rows pay for one
    regex and no finder touches the other rows (masking them as nulls instead still
    costs several passes over the whole column per finder).
    """
    text = pl.col("t")
    flags = completions.to_frame("t").select(
        _rare=text.str.contains(r"####|\\boxed"),  # one pass for both: few replies have either
        _ans=text.str.contains(r"(?i)answer"),
        _eq=text.str.contains("=", literal=True),
    )
    # (name, the literal test a row must pass or None for every open row, the finder)
    boxed = r"(?s)^.*" + _V_BOXED
    finders = [
        ("gsm8k", "_rare", lambda t: _v_last_number(t, _V_GSM8K)),
        ("boxed", "_rare", lambda t: _v_last(t.str.extract(boxed, 1), _V_LAST_NUMBER)),
        ("answer phrase", "_ans", lambda t: _v_last_number(t, _V_ANSWER)),
        ("equals", "_eq", lambda t: _v_last_number(t, _V_EQUALS)),
        ("first line", None, lambda t: _first_line_number(t.str.extract_all(_V_FIRST_LINE))),
        ("last number", None, lambda t: _v_last(t, _V_LAST_NUMBER)),
    ]
    raw = pl.repeat(None, len(completions), dtype=pl.String, eager=True)
    open_ = pl.repeat(True, len(completions), dtype=pl.Boolean, eager=True)  # no answer yet
    provisional = pl.repeat(False, len(completions), dtype=pl.Boolean, eager=True)
    for name, flag, finder in finders:
        rows = (open_ if flag is None else open_ & flags[flag]).arg_true()
        if not len(rows):
            continue
        found = completions.gather(rows).to_frame("t").select(finder(pl.col("t"))).to_series()
        hit = rows.filter(found.is_not_null())
        raw = raw.scatter(hit, found.filter(found.is_not_null()))
        open_ = open_.scatter(hit, False)
        if name in ("equals", "last number"):  # read from reasoning: `_find_answer`
            provisional = provisional.scatter(hit, True)
    return raw, provisional


def canonical_answers(raw: pl.Series) -> pl.Series:
    """`_canonical` of each raw answer (`raw_answers`) after dropping a leading character
    that cannot start a number ("(5" -> "5"): a plain whole number is already canonical,
    the others go through `_canonical_stages`."""
    r = pl.col("r")
    frame = raw.to_frame("r")
    plain = frame.select(r.str.contains(_V_PLAIN_RAW).fill_null(False)).to_series()
    # Right for the plain rows only; the other rows are overwritten below.
    out = frame.select(
        pl.when(r.str.contains("^[1-9]")).then(r).otherwise(r.str.slice(1))
    ).to_series()
    rest = (~plain & raw.is_not_null()).arg_true()
    if len(rest):
        out = out.scatter(rest, _canonical_stages(raw.gather(rest)))
    return out


def _canonical_stages(numbers: pl.Series) -> pl.Series:
    """`_canonical` of each number ("$1.50" -> "1.5", "57.0" -> "57", "007" -> "7") after
    dropping a leading character that cannot start a number ("(5" -> "5", as
    `raw_answers` may leave it). Built in stages: one nested expression would repeat
    its shared sub-expressions many times over."""
    digits = pl.col("_d")
    magnitude = pl.col("_m")
    return (
        numbers.to_frame("n")
        .lazy()
        # Dropped with the spaces, "$" and "," (one regex pass for both).
        .select(_d=pl.col("n").str.replace_all(r"^[^\d$-]|[\s$,]", ""))
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
        .select(
            pl.when(digits.str.starts_with("-") & (magnitude != "0"))
            .then(pl.concat_str(pl.lit("-"), magnitude))
            .otherwise(magnitude)
        )
        .collect()
        .to_series()
    )


def references(answers: pl.Series, strict: bool = True) -> pl.Series:
    """`_reference` of every answer (the canonical reference number), vectorized for
    plain numbers; other answers ("1,234", GSM8K solutions, non-strings) go through
    Python once per distinct value. A non-number raises like `_reference`, or is null
    when not `strict`."""
    if answers.dtype == pl.String:
        plain = pl.when(pl.col("a").str.contains(_V_PLAIN_REFERENCE)).then(pl.col("a"))
        out = canonical_answers(answers.to_frame("a").select(plain).to_series())
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
    """Vectorized `verify` for a frame with `completion` and `answer` (reference) columns,
    and optionally `cut_off` (Boolean, `verify`'s argument per row).

    Returns the frame with `extracted`, `correct` and `reason`, equal to the row-by-row
    `verify` (tests check this on a corpus); the few rows the Rust regexes cannot decide
    (see above) go through `verify` itself. `reference` names a column that already
    holds `references(answer)` (computed once per prompt by the caller).
    """
    completions = frame["completion"]
    raw, provisional = raw_answers(completions)
    found = canonical_answers(raw).alias("extracted")
    extracted, ref = pl.col("extracted"), pl.col("_reference")
    reason = pl.when(extracted.is_null()).then(pl.lit("no_answer"))
    side = [
        pl.Series(
            "_reference", references(frame["answer"]) if reference is None else frame[reference]
        ),
        completions.to_frame("t").select(_defer=pl.col("t").str.contains(_V_DEFER)).to_series(),
    ]
    if "cut_off" in frame.columns:
        # A cut-off rationale's number read from its reasoning is not an answer.
        cut = (frame["cut_off"].fill_null(False) & provisional).alias("_cut")
        found = found.scatter(cut.arg_true(), None)
        reason = pl.when("_cut").then(pl.lit("cut_off")).when(extracted.is_null())
        reason = reason.then(pl.lit("no_answer"))
        side.append(cut)
    # Canonical strings are equal exactly when the numbers are. Two different numbers
    # with at most 5 decimals each differ by at least 1e-5 > TOLERANCE: wrong. Only a
    # pair where one has 6 or more decimals may be within the tolerance; Python decides.
    judged = (
        frame.with_columns(found, *side)
        .with_columns(
            correct=(extracted == ref).fill_null(False),
            _defer=pl.col("_defer")
            | extracted.str.starts_with("-").fill_null(False)
            | ((extracted != ref) & (_many_decimals(extracted) | _many_decimals(ref))).fill_null(
                False
            ),
        )
        .with_columns(
            reason=reason.when(pl.col("correct"))
            .then(pl.lit("correct"))
            .otherwise(pl.lit("wrong_answer"))
        )
        .drop("_reference", "_cut", strict=False)
    )
    deferred = judged["_defer"].arg_true()
    if len(deferred):
        judged = _verify_deferred(judged, deferred)
    return judged.drop("_defer")


def _many_decimals(number: pl.Expr) -> pl.Expr:
    return number.str.len_bytes() - number.str.find(".", literal=True) > 6


def _first_line_number(matches: pl.Expr) -> pl.Expr:
    # The first line's match is the number between decoration and whitespace.
    first = matches.list.first()
    return first.str.strip_chars_start(_LINE_START_CHARS).str.strip_chars_end(_LINE_END_CHARS)


def _v_last(text: pl.Expr, pattern: str) -> pl.Expr:
    # The last of the non-overlapping matches (Python's `finditer` order).
    return text.str.extract_all(pattern).list.last()


def _v_last_number(text: pl.Expr, pattern: str) -> pl.Expr:
    # The number that ends the last match: each such pattern is a keyword, spaces and
    # decoration (`_KEYWORD_CHARS`), then the number.
    return _v_last(text, pattern).str.strip_chars_start(_KEYWORD_CHARS)


def _verify_deferred(out: pl.DataFrame, rows: pl.Series) -> pl.DataFrame:
    completions = out["completion"].gather(rows).to_list()
    answers = out["answer"].gather(rows).to_list()
    cut = (
        out["cut_off"].gather(rows).fill_null(False).to_list()
        if "cut_off" in out.columns
        else [False] * len(rows)
    )
    verdicts = [verify(c, a, k) for c, a, k in zip(completions, answers, cut, strict=True)]
    return out.with_columns(
        out["extracted"].scatter(rows, [v.extracted for v in verdicts]),
        out["correct"].scatter(rows, [v.correct for v in verdicts]),
        out["reason"].scatter(rows, [v.reason for v in verdicts]),
    )
