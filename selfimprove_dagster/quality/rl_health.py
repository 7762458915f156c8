"""Online RL health of a round (grpo / rloo): flat figures from its `rl_steps` table.

"first"/"last" are the means of the first and last quarter of the steps (at least one
step each), so one noisy step does not decide a trend. The WARN checks that read these
figures live in `quality.monitors`.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from selfimprove_dagster.store.schemas import HEALTH_COLUMNS, ROLLOUTS_TABLE, STEPS_TABLE


def health_summary(steps: pl.DataFrame | None, rollouts: pl.DataFrame | None) -> dict:
    """One round's RL health in flat columns (`HEALTH_COLUMNS`, None when not RL)."""
    out: dict[str, Any] = dict.fromkeys(HEALTH_COLUMNS)
    if steps is None or steps.height == 0:
        return out
    steps = steps.sort("step")
    q = max(1, steps.height // 4)

    def mean(column: str, frame: pl.DataFrame = steps) -> float | None:
        values = frame[column].drop_nulls()
        return float(values.mean()) if values.len() else None

    head, tail = steps.head(q), steps.tail(q)
    out |= {
        "rl_steps": steps.height,
        "rl_rollouts": rollouts.height if rollouts is not None else None,
        "rl_reward_first": mean("reward_mean", head),
        "rl_reward_last": mean("reward_mean", tail),
        "rl_reward_mean": mean("reward_mean"),
        "rl_reward_std_mean": mean("reward_std"),
        "rl_zero_std_fraction": mean("zero_std_fraction"),
        "rl_kl_last": mean("kl", tail),
        "rl_entropy_first": mean("entropy", head),
        "rl_entropy_last": mean("entropy", tail),
        "rl_length_first": mean("mean_completion_tokens", head),
        "rl_length_last": mean("mean_completion_tokens", tail),
        "rl_truncated_fraction": mean("truncated_fraction"),
        "rl_clip_ratio": mean("clip_ratio"),
    }
    return out


def round_health(store, round_: str, online: bool) -> dict:
    """The `rl_*` columns of a round's `eval_scores` (all None for a non-RL round)."""
    if not online or not store.has(round_, STEPS_TABLE):
        return health_summary(None, None)
    rollouts = store.read(round_, ROLLOUTS_TABLE) if store.has(round_, ROLLOUTS_TABLE) else None
    return health_summary(store.read(round_, STEPS_TABLE), rollouts)
