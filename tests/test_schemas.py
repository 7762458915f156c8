"""`store.schemas` declares every column each round table can carry (the asset's
column schema and the GE suites' required columns read it): checked against the
frames and schemas the code writes."""

from __future__ import annotations

import polars as pl
import pytest

from selfimprove_dagster.engines.base import Completion, Sampling
from selfimprove_dagster.methods import (
    consistency,
    grpo,
    judge,
    rationalize,
    refine,
    self_verify,
    star,
)
from selfimprove_dagster.quality import monitors
from selfimprove_dagster.sources import mix
from selfimprove_dagster.sources import synthesis as syn
from selfimprove_dagster.store import schemas
from tests.test_grpo import TINY_RL, _logged
from tests.test_methods import _generations, _prompts


def _declared(table: str) -> set[str]:
    return {c.name for c in schemas.columns(table)}


def _round_frames():
    generations = _generations({"p1": ["5", "6"], "p2": ["7", "7"]})
    prompts = _prompts({"p1": "5", "p2": "8"})
    critiques = star.critique_generations(generations, prompts)
    return generations, prompts, critiques


def _written() -> dict[str, set[str]]:
    """Every column the code writes, per table."""
    generations, prompts, critiques = _round_frames()
    scored = critiques.with_columns(score=pl.Series([1.0, 0.0, 0.5, 0.2]))
    filtered = {
        *star.filter_accepted(generations, critiques, 1).columns,
        *judge.preference_pairs(generations, scored, 0.1).columns,
        *grpo.select_rl_prompts(generations, critiques, 2, "all", 0).columns,
    }
    eval_scores = {
        "round", "checkpoint", "policy", "accuracy_before", "accuracy_after", "pass_at_k",
        "k", "n_eval", "method", "next_temperature", "next_temperature_reason",
        "eval_seconds",
        *monitors.round_health(generations, critiques, star.filter_accepted(
            generations, critiques, 1), k=2, target=1),
        *schemas.METRIC_COLUMNS,
        *schemas.HEALTH_COLUMNS,
    }  # fmt: skip
    return {
        "prompts": set(mix.PROMPT_SCHEMA),
        "prompt_candidates": set(syn.CANDIDATE_SCHEMA),
        "generations": set(
            star.generations_frame(
                "round_000",
                prompts.with_columns(prompt=pl.lit("q")),
                [Completion(0, 0, "5", 3, 1, "stop")],
                "base",
                Sampling(),
            ).columns
        ),
        "critiques": {
            *consistency.CRITIQUE_SCHEMA,
            *judge.CRITIQUE_SCHEMA,
            *self_verify.CRITIQUE_SCHEMA,
        },
        "refinements": {*refine.REFINEMENT_SCHEMA, *rationalize._empty().columns},
        "filtered": filtered,
        "rollouts": set(
            grpo.rollout_rows(_logged(), "round_003", "ckpt", TINY_RL, ["verifier_reward"]).columns
        ),
        "rl_steps": set(grpo.step_rows([], "round_000").columns),
        "eval_scores": eval_scores,
    }


WRITTEN = _written()


@pytest.mark.parametrize("table", sorted(WRITTEN))
def test_every_written_column_is_declared(table):
    missing = WRITTEN[table] - _declared(table)
    assert not missing, f"{table}: add {sorted(missing)} to store/schemas.py"


def test_every_declared_column_has_a_description_and_a_polars_type():
    for table, declared in schemas.TABLE_COLUMNS.items():
        for column in declared:
            assert column.description, f"{table}.{column.name} has no description"
            assert column.type.split("(")[0] in dir(pl), f"{table}.{column.name}: {column.type}"


def test_rollouts_require_the_columns_their_suite_checks():
    assert set(schemas.required_columns("rollouts")) >= {
        "generation_id", "phase", "step", "reward", "verdict",
    }  # fmt: skip
