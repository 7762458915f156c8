"""Data-quality gates as pure functions: each returns a `GateResult` that an
`@dg.asset_check` converts into an `AssetCheckResult` (observed value, threshold,
and a message naming the problem and the fix when it fails)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import polars as pl


@dataclass(frozen=True)
class GateResult:
    passed: bool
    observed: Any
    threshold: Any
    message: str
    details: dict[str, Any] = field(default_factory=dict)


def gate_min_rows(frame: pl.DataFrame, minimum: int, what: str = "filtered set") -> GateResult:
    """A round must have at least `minimum` rows to train on."""
    rows = frame.height
    passed = rows >= minimum
    message = (
        f"{what} has {rows} rows (minimum {minimum})"
        if passed
        else f"The {what} has {rows} rows, fewer than the minimum {minimum}: the round cannot "
        "train. Fix: sample more (raise samples_per_prompt or temperature), use more or easier "
        "prompts, or lower min_filtered"
    )
    return GateResult(passed, rows, minimum, message)


def gate_unique_ids(frame: pl.DataFrame, column: str = "generation_id") -> GateResult:
    """No id may appear twice (a duplicate would be trained on twice)."""
    duplicated = frame.filter(pl.col(column).is_duplicated())[column].unique().to_list()
    passed = not duplicated
    message = (
        f"all {frame.height} `{column}` values are unique"
        if passed
        else f"{len(duplicated)} `{column}` values appear more than once (e.g. {duplicated[:3]}). "
        "Fix: rematerialize the upstream assets of this round; do not append to their files"
    )
    return GateResult(passed, len(duplicated), 0, message, {"duplicates": duplicated[:10]})


def gate_training_ran(manifest: dict[str, Any]) -> GateResult:
    """Loss is finite and every planned optimizer step ran (catches silent under-training)."""
    steps, planned = manifest.get("optimizer_steps", 0), manifest.get("planned_steps", 0)
    loss = manifest.get("final_loss")
    finite = loss is not None and math.isfinite(loss)
    passed = finite and steps >= planned
    message = (
        f"{steps}/{planned} optimizer steps, final loss {loss:.4f}"
        if passed
        else f"Training is suspect: {steps}/{planned} optimizer steps, final loss {loss}. "
        "Fix: lower the learning rate if the loss is not finite; check the filtered set and "
        "batch size if steps are missing"
    )
    return GateResult(passed, {"steps": steps, "final_loss": loss}, {"steps": planned}, message)
