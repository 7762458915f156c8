"""Gates on a round's prompts, as pure functions returning `quality.GateResult`
(wrapped as blocking asset checks on `prompts` in `assets/checks.py`).

A round's prompts must be unique, non-empty and within length bounds; and no train
prompt, synthesized ones included, may repeat a held-out eval prompt
(`quality.gate_no_contamination`, the same test `filtered` is gated with).
"""

from __future__ import annotations

import polars as pl

from selfimprove_dagster.quality.gates import MAX_LISTED, GateResult
from selfimprove_dagster.text import normalize_prompt


def gate_unique_prompts(prompts: pl.DataFrame) -> GateResult:
    """No prompt appears twice in a round (same `prompt_id`, or the same text up to
    case, spacing and trailing punctuation): it would be sampled and trained twice."""
    keys = prompts.select(
        "prompt_id",
        "prompt",
        _key=pl.col("prompt").fill_null("").map_elements(normalize_prompt, return_dtype=pl.String),
    )
    repeated = keys.filter(pl.col("prompt_id").is_duplicated() | pl.col("_key").is_duplicated())
    listed = repeated["prompt"].unique(maintain_order=True).head(MAX_LISTED).to_list()
    passed = repeated.height == 0
    message = (
        f"all {prompts.height} prompts are distinct"
        if passed
        else f"{repeated.height} rows repeat another prompt of the round (e.g. {listed[0]!r}). "
        "Fix: deduplicate the source (dataset file, synthesis) and rematerialize `prompts`"
    )
    return GateResult(passed, repeated.height, 0, message, {"repeated": listed} if listed else {})


def gate_nonempty_prompts(prompts: pl.DataFrame) -> GateResult:
    """Every prompt has text, and every verified (ground-truth) row has an answer."""
    empty = prompts.filter(pl.col("prompt").fill_null("").str.strip_chars() == "")
    no_answer = prompts.filter(
        pl.col("answer_verified").fill_null(True) & pl.col("answer").fill_null("").eq("")
        if "answer_verified" in prompts.columns
        else pl.col("answer").fill_null("").eq("")
    )
    bad = pl.concat([empty.select("prompt_id"), no_answer.select("prompt_id")]).unique()
    passed = bad.height == 0
    message = (
        f"all {prompts.height} prompts have text and an answer"
        if passed
        else f"{empty.height} prompts are empty and {no_answer.height} have no answer "
        f"(e.g. prompt_id {bad['prompt_id'][0]}). Fix: drop those rows from the source"
    )
    details = {"prompt_ids": bad["prompt_id"].head(MAX_LISTED).to_list()} if not passed else {}
    return GateResult(passed, bad.height, 0, message, details)


def gate_prompt_lengths(prompts: pl.DataFrame, min_chars: int, max_chars: int) -> GateResult:
    """Every prompt is `min_chars`..`max_chars` characters long (stripped)."""
    lengths = prompts.select(
        "prompt", _chars=pl.col("prompt").fill_null("").str.strip_chars().str.len_chars()
    )
    outside = lengths.filter((pl.col("_chars") < min_chars) | (pl.col("_chars") > max_chars))
    shortest = int(lengths["_chars"].min() or 0)
    longest = int(lengths["_chars"].max() or 0)
    passed = outside.height == 0
    message = (
        f"prompt lengths {shortest}..{longest} characters, within {min_chars}..{max_chars}"
        if passed
        else f"{outside.height} prompts are outside {min_chars}..{max_chars} characters "
        f"(shortest {shortest}, longest {longest}; e.g. {outside['prompt'][0][:80]!r}). Fix: "
        "filter the source, or change min_prompt_chars / max_prompt_chars"
    )
    details = {"shortest": shortest, "longest": longest}
    if not passed:
        details["outside"] = [p[:200] for p in outside["prompt"].head(MAX_LISTED)]
    return GateResult(
        passed, outside.height, {"min": min_chars, "max": max_chars}, message, details
    )
