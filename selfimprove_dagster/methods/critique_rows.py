"""The row every critic writes to `critiques` (verifier, majority vote, judge, refiner).

Critics add their own columns after these; `critique_row` fills the shared ones, so
ground truth is recorded the same way by every critic (and used by none to select,
except the verifier, whose whole job it is).

Ground truth and the extracted answer follow the prompt row's verifier (the row's
`verifier` column; absent: numeric), through `verifiers.dispatch`: a critic computes
them for a whole frame with `ground_truths` (each verifier's rows in one batch, code
candidates in parallel) and hands each sample's `Truth` to `critique_row`.

    truths = ground_truths(generations, prompts)     # one Truth per generation row
    critique_row(sample, "majority_vote", ..., truth=truths[i])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from selfimprove_dagster.sources.tasks import VERIFIER_COLUMNS
from selfimprove_dagster.verifiers.dispatch import verifier_name, verify_rows
from selfimprove_dagster.verifiers.numeric import extract_answer, ground_truth

CRITIQUE_SCHEMA = {
    "round": pl.String,
    "generation_id": pl.String,
    "prompt_id": pl.String,
    "critic": pl.String,
    "verdict": pl.String,  # accept / reject
    "correct": pl.Boolean,  # ground truth; null for a prompt without a reference
    "extracted_answer": pl.String,
    "reference_answer": pl.String,
    "reason": pl.String,
    "score": pl.Float64,  # 0..1; null when the critic gave none
    "critique": pl.String,  # the critique in words
}

# A code verdict's extracted answer is the whole program: cut it so the row stays readable.
MAX_EXTRACTED_CHARS = 2000


@dataclass(frozen=True)
class Truth:
    """Ground truth of one sample under its row's verifier (measurement only)."""

    correct: bool | None  # None: the prompt has no reference answer
    extracted: str | None  # the answer the row's verifier reads in the sample


def prompt_rows(prompts: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """prompt_id -> what its verifier reads: `answer` and the verifier columns present."""
    keep = ["answer", *[c for c in VERIFIER_COLUMNS if c in prompts.columns]]
    unique = prompts.select("prompt_id", *keep).unique("prompt_id", keep="first")
    return {row.pop("prompt_id"): row for row in unique.iter_rows(named=True)}


def ground_truths(samples: pl.DataFrame, prompts: pl.DataFrame) -> list[Truth]:
    """One `Truth` per row of `samples` (prompt_id, completion), in order: the verdict of
    the prompt row's verifier where the prompt has a reference answer, else only the
    answer that verifier would read (`extract_for`)."""
    rows = prompt_rows(prompts)
    matched = [rows.get(p) for p in samples["prompt_id"]]
    return truths_for(samples["completion"].to_list(), matched)


def truths_for(completions: list[str], rows: list[Mapping[str, Any] | None]) -> list[Truth]:
    """`ground_truths` for completions and their prompt rows (None: an unknown prompt)."""
    judged = [i for i, r in enumerate(rows) if r is not None and r.get("answer") is not None]
    verdicts = verify_rows([completions[i] for i in judged], [rows[i] for i in judged])
    by_index = {
        i: Truth(v.correct, _short(v.extracted)) for i, v in zip(judged, verdicts, strict=True)
    }
    return [
        by_index.get(i) or Truth(None, None if row is None else extract_for(text, row))
        for i, (text, row) in enumerate(zip(completions, rows, strict=True))
    ]


def extract_for(completion: str, row: Mapping[str, Any]) -> str | None:
    """The answer the row's verifier reads in `completion`, without a reference: the
    number (numeric), the chosen label (multiple_choice), the final answer's LaTeX
    (math), the program (code); None for a custom verifier (it only judges)."""
    name = verifier_name(row)
    text = completion or ""
    if name == "numeric":
        return extract_answer(text)
    if name == "multiple_choice":
        from selfimprove_dagster.verifiers.multiple_choice import choice_map, extract_choice

        return extract_choice(text, choice_map(row.get("choices")))
    if name == "math":
        parsed = math_answer(text)
        return None if parsed is None else parsed[1]
    if name == "code":
        from selfimprove_dagster.verifiers.code import extract_code

        return _short(extract_code(text))
    return None


def critique_row(
    sample: dict,
    critic: str,
    accepted: bool,
    reference: object | None,
    reason: str,
    score: float | None,
    critique: str | None,
    *,
    truth: Truth | None = None,
) -> dict:
    """The shared columns for `sample` (a row with round, generation_id, prompt_id and
    completion). `truth` is the sample's ground truth under its row's verifier
    (`ground_truths`); without it the reference is read as a number (numeric rows)."""
    completion = sample["completion"]
    if truth is None:
        truth = Truth(ground_truth(completion, reference), extract_answer(completion))
    return {
        "round": sample["round"],
        "generation_id": sample["generation_id"],
        "prompt_id": sample["prompt_id"],
        "critic": critic,
        "verdict": "accept" if accepted else "reject",
        "correct": truth.correct,
        "extracted_answer": truth.extracted,
        "reference_answer": None if reference is None else str(reference),
        "reason": reason,
        "score": score,
        "critique": critique,
    }


def math_answer(completion: str) -> tuple[list, str] | None:
    """A reply's final math answer as math-verify reads it: (parsed, its LaTeX), or None
    when it states none. The part read is the math verifier's (`final_answer_text`: the
    last \\boxed{}, else the last "answer is" line, else the whole reply)."""
    import threading

    from math_verify import parse

    from selfimprove_dagster.verifiers.math import TIMEOUT_SECONDS, final_answer_text

    final = final_answer_text(completion or "")
    if not final:
        return None
    # math-verify's timeout uses SIGALRM, which works only in the main thread.
    main = threading.current_thread() is threading.main_thread()
    try:
        parsed = parse(final, parsing_timeout=TIMEOUT_SECONDS if main else None)
    except Exception:  # an unparsable reply is a reply without an answer
        return None
    return (parsed, str(parsed[-1])) if parsed else None


def same_math(a: list, b: list) -> bool:
    """Whether two parsed math answers are equal (math-verify, either way round)."""
    import threading

    from math_verify import verify

    from selfimprove_dagster.verifiers.math import TIMEOUT_SECONDS

    timeout = TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(verify(a, b, timeout_seconds=timeout) or verify(b, a, timeout_seconds=timeout))
    except Exception:  # sympy errors on exotic input: not shown equal
        return False


def _short(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_EXTRACTED_CHARS:
        return text
    return text[:MAX_EXTRACTED_CHARS] + "..."
