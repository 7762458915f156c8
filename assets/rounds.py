"""One loop's Dagster definitions: `build_loop(spec)`.

The six steps of a self-improvement round (one partition per round), one module per
stage, each body a call to the core function named beside it:

    prompts      assets/generate.py  -> sources.mix.round_prompts
    generations  assets/generate.py  -> methods.star.sample_generations
    critiques    assets/critique.py  -> methods.recipe.critique_round
    filtered     assets/critique.py  -> methods.recipe.select_round_training_set
    checkpoint   assets/train.py     -> methods.checkpoint.train_round
    eval_scores  assets/evaluate.py  -> evaluation.score_round

plus the loop's gates (assets/checks.py), `promoted_policy` and `history`
(assets/policy.py), its round job, sensors and schedule (assets/sensors.py), and its
resources under its own keys. Round N's policy is round N−1's checkpoint, or the best
one so far with `policy=best` (`evolution.round_policy`); `critiques`, `checkpoint` and
`eval_scores` read it back from the round's `generations`, so they always agree.
"""

from __future__ import annotations

import dagster as dg

from selfimprove_dagster.assets.add_round import add_round_job
from selfimprove_dagster.assets.checks import round_checks
from selfimprove_dagster.assets.critique import critiques_asset, filtered_asset
from selfimprove_dagster.assets.evaluate import eval_scores_asset
from selfimprove_dagster.assets.generate import generations_asset, prompts_asset
from selfimprove_dagster.assets.loop import LOOP_TAG, Loop, LoopSpec
from selfimprove_dagster.assets.policy import policy_definitions
from selfimprove_dagster.assets.sensors import loop_sensors
from selfimprove_dagster.assets.train import checkpoint_asset

LOOP_METADATA_PREFIX = "selfimprove/loop/"


def round_assets(loop: Loop) -> list[dg.AssetsDefinition]:
    """The six steps of one loop's round, in run order."""
    return [
        prompts_asset(loop),
        generations_asset(loop),
        critiques_asset(loop),
        filtered_asset(loop),
        checkpoint_asset(loop),
        eval_scores_asset(loop),
    ]


def round_job(loop: Loop, assets: list[dg.AssetsDefinition]) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        loop.job_name,
        selection=dg.AssetSelection.assets(*assets),
        description=f"One round of loop `{loop.name}`: generate -> critique -> filter -> "
        "train -> eval.",
        tags={LOOP_TAG: loop.name},
    )


def loop_info(spec: LoopSpec) -> dict:
    """What the CLI and the experiments asset read of a loop (Definitions metadata)."""
    s = spec.resources
    return {
        "name": spec.name,
        "description": spec.description,
        "data_dir": s["storage"].data_dir,
        "task": s["task"].dataset_path or s["task"].task,
        "method": s["method"].method,
        "base_model": s["generator"].base_model,
        "env_prefix": spec.env_prefix,
    }


def build_loop(spec: LoopSpec) -> dg.Definitions:
    """Every Dagster object of one loop, each name carrying the loop's name."""
    loop = Loop.of(spec)
    assets = round_assets(loop)
    checks = round_checks(loop)
    policy, policy_job, policy_sensor = policy_definitions(loop, assets, checks)
    sensors, schedules = loop_sensors(loop)
    return dg.Definitions(
        assets=[*assets, *policy],
        asset_checks=checks,
        jobs=[round_job(loop, assets), policy_job, add_round_job(loop)],
        sensors=[*sensors, policy_sensor],
        schedules=schedules,
        resources=loop.resources(),
        metadata={LOOP_METADATA_PREFIX + spec.name: loop_info(spec)},
    )


def loops_of(defs: dg.Definitions) -> dict[str, dict]:
    """The loops a code location's definitions hold, by name (from their metadata)."""
    found = {}
    for key, value in (defs.metadata or {}).items():
        if key.startswith(LOOP_METADATA_PREFIX):
            found[key.removeprefix(LOOP_METADATA_PREFIX)] = getattr(value, "data", value)
    return dict(sorted(found.items()))
