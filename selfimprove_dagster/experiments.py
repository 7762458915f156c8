"""Loops compared: one row per loop and round (the `experiments` asset and its DuckDB
view), so a team running several loops reads them side by side.

    rows = experiment_rows("add2_grpo", info, eval_rows, done, promoted, wall_seconds)

Columns: loop, round, method (the recipe), base_model, task, kept (training rows),
accuracy_before, accuracy_after, pass_at_k, wall_seconds (the round's last run, first
step start to last step end), done (Dagster recorded it, gates passed, chain current),
promoted (the loop's promoted checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl

EXPERIMENT_SCHEMA = {
    "loop": pl.String,
    "round": pl.String,
    "method": pl.String,
    "base_model": pl.String,
    "task": pl.String,
    "kept": pl.Int64,
    "accuracy_before": pl.Float64,
    "accuracy_after": pl.Float64,
    "pass_at_k": pl.Float64,
    "wall_seconds": pl.Float64,
    "done": pl.Boolean,
    "promoted": pl.Boolean,
}


def experiment_rows(
    loop: str,
    info: Mapping[str, str],
    eval_rows: pl.DataFrame,
    done: Sequence[str],
    promoted: str | None,
    wall_seconds: Mapping[str, float | None],
) -> pl.DataFrame:
    """One loop's rounds (its recorded `eval_scores` rows) as experiment rows."""
    rows = []
    for row in eval_rows.iter_rows(named=True):
        round_ = row["round"]
        rows.append(
            {
                "loop": loop,
                "round": round_,
                "method": row.get("method") or info.get("method"),
                "base_model": info.get("base_model"),
                "task": info.get("task"),
                "kept": row.get("kept"),
                "accuracy_before": row.get("accuracy_before"),
                "accuracy_after": row.get("accuracy_after"),
                "pass_at_k": row.get("pass_at_k"),
                "wall_seconds": wall_seconds.get(round_),
                "done": round_ in done,
                "promoted": round_ == promoted,
            }
        )
    return pl.DataFrame(rows, schema=EXPERIMENT_SCHEMA)


def compare(frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """Every loop's rows, by loop then round."""
    if not frames:
        return pl.DataFrame(schema=EXPERIMENT_SCHEMA)
    return pl.concat(frames, how="vertical").sort("loop", "round")
