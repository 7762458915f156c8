"""The verifier for multiple-choice answers (CommonsenseQA and any row with `choices`).

A row's `answer` is the correct label ("B"); `choices` maps labels to option texts
({"A": "bank", "B": "library", ...}; a list is labelled A, B, C, ... in order). The
completion may name its choice in any of the ways a small model writes one:

    "The answer is (B)."   "Answer: B"   "B) library"   "B. library"   "**B**"   "library"

Extraction tries, in order: the last "answer is X" / "Answer: X" / "\\boxed{X}", a
line that starts with a label ("B)", "(B)", "B.", "B:") when all such lines name the
same label (a reply that lists several options chose none of them), a reply that is
just a label, and finally the option text alone when exactly one option's text
appears in the reply. The extracted answer is the label.

`verify_frame` does the same on a whole frame with Polars expressions (no Python loop
per row); only rows where no label is found fall back to the option-text search.
"""

from __future__ import annotations

import contextlib
import json
import re
import string
from collections.abc import Mapping
from typing import Any

import polars as pl

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.verifiers.verdict import Verdict

# A label is one capital letter A-J (CommonsenseQA uses A-E, some sets go further).
_LABEL = r"[A-J]"
# "the answer is (B)", "Answer: B", "correct answer would be **B**", "answer - B".
_ANSWER_PATTERN = (
    r"(?i:\banswer\b(?:\s+(?:is|was|would\s+be|will\s+be|should\s+be))?)"
    r"\s*(?:[:=\-]\s*)?(?:option\s+|choice\s+)?[\s*(\[\"']*(" + _LABEL + r")\b"
)
_BOXED_PATTERN = r"\\boxed\s*\{\s*(?:\\text\{)?\s*(" + _LABEL + r")\b"
# A line starting with a label: "B) ...", "(B) ...", "B. ...", "B: ...", "**B.** ...".
_LINE_PATTERN = r"(?m)^[\s*]*\(?(" + _LABEL + r")(?:[).:]|\s*$)"
# A reply that is only a label, maybe decorated: "B", "(B)", "**B**", "B.".
_BARE_PATTERN = r"^[\s*(\[]*(" + _LABEL + r")[\s*)\].!]*$"
_LABEL_IN_LINE = r"(" + _LABEL + r")"

_ANSWER_RE = re.compile(_ANSWER_PATTERN)
_BOXED_RE = re.compile(_BOXED_PATTERN)
_LINE_RE = re.compile(_LINE_PATTERN)
_BARE_RE = re.compile(_BARE_PATTERN)


def choice_map(choices: object) -> dict[str, str]:
    """`choices` as {label: text}: a mapping is kept (labels upper-cased), a list gets
    labels A, B, C, ...; a JSON string of either (the problem table's `choices`
    column) is read first; anything else is a SelfImproveError."""
    if isinstance(choices, str):
        with contextlib.suppress(json.JSONDecodeError):
            choices = json.loads(choices)
    if isinstance(choices, Mapping):
        mapped = {str(k).strip().upper(): str(v) for k, v in choices.items() if v is not None}
    elif isinstance(choices, list | tuple):
        mapped = {string.ascii_uppercase[i]: str(v) for i, v in enumerate(choices)}
    else:
        mapped = {}
    if len(mapped) < 2:
        raise SelfImproveError(
            f"a multiple-choice row needs at least two choices (got {choices!r})",
            'give `choices` as {"A": "text", "B": "text", ...} or a list of option texts',
        )
    return mapped


def extract_choice(completion: str, choices: Mapping[str, str] | None = None) -> str | None:
    """The label a reply chose (upper-case), or None when it names none of `choices`."""
    return _find_choice(completion, choices)[0]


def verify_row(completion: str, row: Mapping[str, Any]) -> Verdict:
    """Whether `completion` picks `row["answer"]` among `row["choices"]`.

    `row["cut_off"]` (absent: False): the reply stopped at the token limit in a round
    that asks for reasoning and a final "Answer: X" line. An option named only in the
    reasoning (the option-text fallback) is then not a choice: reason `cut_off`.
    """
    choices = choice_map(row.get("choices"))
    reference = reference_label(row.get("answer"), choices)
    extracted, by_text = _find_choice(completion, choices)
    if extracted is not None and by_text and row.get("cut_off"):
        return Verdict(correct=False, extracted=None, reason="cut_off")
    if extracted is None:
        return Verdict(correct=False, extracted=None, reason="no_answer")
    if extracted == reference:
        return Verdict(correct=True, extracted=extracted, reason="correct")
    return Verdict(correct=False, extracted=extracted, reason="wrong_answer")


def verify_rows(completions: list[str], rows: list[Mapping[str, Any]]) -> list[Verdict]:
    """`verify_row` over a batch, through the vectorized `verify_frame`."""
    frame = pl.DataFrame(
        {
            "completion": completions,
            "answer": [
                reference_label(r.get("answer"), choice_map(r.get("choices"))) for r in rows
            ],
            "cut_off": [bool(r.get("cut_off")) for r in rows],
        },
        schema={"completion": pl.String, "answer": pl.String, "cut_off": pl.Boolean},
    )
    choices = [choice_map(r.get("choices")) for r in rows]
    out = verify_frame(frame, choices)
    return [
        Verdict(correct=c, extracted=e, reason=r)
        for c, e, r in zip(out["correct"], out["extracted"], out["reason"], strict=True)
    ]


def reference_label(answer: object, choices: Mapping[str, str]) -> str:
    """The correct label: `answer` is a label ("B", "b", "(B)") or the text of a choice."""
    text = "" if answer is None else str(answer).strip()
    label = text.strip("()[] .").upper()
    if label in choices:
        return label
    for key, value in choices.items():
        if _norm(value) == _norm(text):
            return key
    raise SelfImproveError(
        f"multiple-choice answer {answer!r} is neither a label nor a choice text "
        f"(labels {', '.join(choices)})",
        "make `answer` the correct label (e.g. 'B') or the exact text of the correct choice",
    )


def label_expr(completion: pl.Expr) -> pl.Expr:
    """Polars expression: the label a reply chose by the label rules (not option text)."""
    line_labels = completion.str.extract_all(_LINE_PATTERN).list.eval(
        pl.element().str.extract(_LABEL_IN_LINE, 1)
    )
    one_line_label = pl.when(line_labels.list.unique().list.len() == 1).then(
        line_labels.list.first()
    )
    return pl.coalesce(
        _last_group(completion, _ANSWER_PATTERN),
        _last_group(completion, _BOXED_PATTERN),
        one_line_label,
        pl.when(line_labels.list.len().fill_null(0) == 0).then(
            completion.str.strip_chars().str.extract(_BARE_PATTERN, 1)
        ),
    ).str.to_uppercase()


def verify_frame(
    frame: pl.DataFrame,
    choices: list[Mapping[str, str]] | None = None,
    choices_by_prompt: Mapping[str, Mapping[str, str]] | None = None,
) -> pl.DataFrame:
    """Vectorized verdicts for a frame with `completion` and `answer` (the correct label),
    and optionally `cut_off` (Boolean, `verify_row`'s `row["cut_off"]` per row).

    Returns the frame with `extracted`, `correct` and `reason`. Rows where no label rule
    matches fall back to the option-text search when `choices` (one mapping per row) or
    `choices_by_prompt` (one mapping per `prompt_id` of the frame) are given; label
    rules ignore labels outside a row's choices only on that fallback path.
    """
    out = frame.with_columns(extracted=label_expr(pl.col("completion")), _by_text=pl.lit(False))
    if choices is not None:
        out = _fallback_to_text(out, choices)
    elif choices_by_prompt is not None:
        out = _fallback_by_prompt(out, choices_by_prompt)
    cut = pl.lit(False)
    if "cut_off" in out.columns:
        # A cut-off rationale that names an option only in its reasoning chose none.
        cut = (
            pl.col("cut_off").fill_null(False)
            & pl.col("_by_text")
            & pl.col("extracted").is_not_null()
        )
    return (
        out.with_columns(_cut=cut)
        .with_columns(extracted=pl.when(~pl.col("_cut")).then(pl.col("extracted")))
        .with_columns(
            correct=pl.col("extracted").is_not_null() & (pl.col("extracted") == pl.col("answer")),
            reason=pl.when(pl.col("_cut"))
            .then(pl.lit("cut_off"))
            .when(pl.col("extracted").is_null())
            .then(pl.lit("no_answer"))
            .when(pl.col("extracted") == pl.col("answer"))
            .then(pl.lit("correct"))
            .otherwise(pl.lit("wrong_answer")),
        )
        .with_columns(pl.col("correct").fill_null(False))
        .drop("_by_text", "_cut")
    )


# --- helpers ---------------------------------------------------------------------


def _last_group(text: pl.Expr, pattern: str) -> pl.Expr:
    # `(?s)^.*X` is greedy: it matches the *last* occurrence of X (Rust regex, no lookbehind).
    return text.str.extract(r"(?s)^.*" + pattern, 1)


def _find_choice(completion: str, choices: Mapping[str, str] | None) -> tuple[str | None, bool]:
    # `extract_choice`, and whether the label came from the option-text search.
    labels = set(choices) if choices else None
    for pattern in (_ANSWER_RE, _BOXED_RE):
        found = [m.group(1).upper() for m in pattern.finditer(completion)]
        found = [f for f in found if labels is None or f in labels]
        if found:
            return found[-1], False
    lines = {m.group(1).upper() for m in _LINE_RE.finditer(completion)}
    if len(lines) > 1:
        return None, False  # it listed the options
    if lines:
        line = lines.pop()
        return (line if labels is None or line in labels else None), False
    match = _BARE_RE.search(completion.strip())
    if match and (labels is None or match.group(1).upper() in labels):
        return match.group(1).upper(), False
    return (_choice_by_text(completion, choices), True) if choices else (None, False)


def _fallback_to_text(frame: pl.DataFrame, choices: list[Mapping[str, str]]) -> pl.DataFrame:
    # Also sets `_by_text`: the label came from the option-text search.
    extracted = frame["extracted"].to_list()
    by_text = [False] * len(extracted)
    completions = frame["completion"].to_list()
    for i, (label, options) in enumerate(zip(extracted, choices, strict=True)):
        if label is None or label not in options:
            extracted[i], by_text[i] = _find_choice(completions[i], options)
    return frame.with_columns(
        extracted=pl.Series(extracted, dtype=pl.String),
        _by_text=pl.Series(by_text, dtype=pl.Boolean),
    )


def _fallback_by_prompt(
    frame: pl.DataFrame, choices_by_prompt: Mapping[str, Mapping[str, str]]
) -> pl.DataFrame:
    # `_fallback_to_text` with the per-row tests in Polars. A row needs Python when it
    # has a label outside its prompt's labels ("|A|B|C|" lacks "|F|"): `extract_choice`
    # with the choices, whose label rules skip such labels. A row without any label
    # has, in `extract_choice`, no answer phrase, no box, no bare label and not exactly
    # one line label: with several line labels it listed the options (None), with none
    # only the option-text search is left, so Python runs just `_choice_by_text`.
    labels = pl.DataFrame(
        {
            "prompt_id": list(choices_by_prompt),
            "_labels": ["|" + "|".join(m) + "|" for m in choices_by_prompt.values()],
        },
        schema={"prompt_id": frame.schema["prompt_id"], "_labels": pl.String},
    )
    label = pl.concat_str(pl.lit("|"), pl.col("extracted"), pl.lit("|"))
    unlabelled = pl.col("extracted").is_null()
    line_labels = (
        pl.when(unlabelled)
        .then(pl.col("completion"))
        .str.extract_all(_LINE_PATTERN)
        .list.eval(pl.element().str.extract(_LABEL_IN_LINE, 1))
    )
    tests = (
        frame.select("prompt_id", "extracted", "completion")
        .join(labels, on="prompt_id", how="left", maintain_order="left")
        .select(
            outside=~unlabelled
            & ~pl.col("_labels").str.contains(label, literal=True).fill_null(False),
            by_text=unlabelled & (line_labels.list.unique().list.len() == 0),
        )
    )
    normalized: dict[str, dict[str, str]] = {}  # a prompt's options, normalized once

    def by_text(completion: str, prompt: str) -> tuple[str | None, bool]:
        if prompt not in normalized:
            options = choices_by_prompt[prompt]
            normalized[prompt] = {label: _norm(o) for label, o in options.items()}
        return _mentioned(_norm(completion), normalized[prompt]), True

    def outside(completion: str, prompt: str) -> tuple[str | None, bool]:
        return _find_choice(completion, choices_by_prompt[prompt])

    # Also sets `_by_text`: the label came from the option-text search.
    found, found_by_text = frame["extracted"], frame["_by_text"]
    for column, judge in (("outside", outside), ("by_text", by_text)):
        rows = tests[column].arg_true()
        if len(rows):
            completions = frame["completion"].gather(rows).to_list()
            prompts = frame["prompt_id"].gather(rows).to_list()
            picked = [judge(c, p) for c, p in zip(completions, prompts, strict=True)]
            found = found.scatter(rows, pl.Series([p[0] for p in picked], dtype=pl.String))
            found_by_text = found_by_text.scatter(
                rows, pl.Series([p[1] for p in picked], dtype=pl.Boolean)
            )
    return frame.with_columns(found, found_by_text)


def _choice_by_text(completion: str, choices: Mapping[str, str]) -> str | None:
    """The one option whose text the reply mentions; None for none or several. A
    mention inside a longer mentioned option ("store" in "department store") does not
    count as its own."""
    return _mentioned(_norm(completion), {label: _norm(o) for label, o in choices.items()})


def _mentioned(text: str, options: Mapping[str, str]) -> str | None:
    # `_choice_by_text` on the normalized reply and options (`_norm` of each).
    spans = {label: _word_spans(text, option) for label, option in options.items()}
    spans = {label: found for label, found in spans.items() if found is not None}
    every = [span for found in spans.values() for span in found]

    def inside_another(span: tuple[int, int]) -> bool:
        return any(o != span and o[0] <= span[0] and span[1] <= o[1] for o in every)

    mentioned = {
        label for label, found in spans.items() if any(not inside_another(s) for s in found)
    }
    return mentioned.pop() if len(mentioned) == 1 else None


def _word_spans(text: str, phrase: str) -> list[tuple[int, int]] | None:
    """Spans of `re.finditer(r"(?<!\w)<phrase>(?!\w)", text)` (None for an empty phrase)
    without compiling a regex per option: `_norm` leaves words joined by single spaces,
    so a match not inside a word is " phrase " in " text " (the padding space before
    the match sits at the match's own index in `text`)."""
    if not phrase:
        return None
    padded, needle = f" {text} ", f" {phrase} "
    spans, start = [], padded.find(needle)
    while start >= 0:
        spans.append((start, start + len(phrase)))
        start = padded.find(needle, start + len(phrase))  # non-overlapping, like finditer
    return spans


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())
