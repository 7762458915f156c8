"""The row every critic writes to `critiques` (verifier, majority vote, judge, refiner).

Critics add their own columns after these; `critique_row` fills the shared ones, so
ground truth is recorded the same way by every critic (and used by none to select,
except the verifier, whose whole job it is).
"""

from __future__ import annotations

import polars as pl

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


def critique_row(
    sample: dict,
    critic: str,
    accepted: bool,
    reference: object | None,
    reason: str,
    score: float | None,
    critique: str | None,
) -> dict:
    """The shared columns for `sample` (a row with round, generation_id, prompt_id and
    completion)."""
    completion = sample["completion"]
    return {
        "round": sample["round"],
        "generation_id": sample["generation_id"],
        "prompt_id": sample["prompt_id"],
        "critic": critic,
        "verdict": "accept" if accepted else "reject",
        "correct": ground_truth(completion, reference),
        "extracted_answer": extract_answer(completion),
        "reference_answer": None if reference is None else str(reference),
        "reason": reason,
        "score": score,
        "critique": critique,
    }
