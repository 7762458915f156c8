"""Dagster layer: round assets, their checks, the round job; the promoted policy and
the history across rounds (assets/policy.py). Thin over the core."""

import dagster as dg

from assets.checks import ROUND_CHECKS
from assets.partitions import ROUNDS
from assets.policy import POLICY_ASSETS, policy_automation_sensor, policy_job
from assets.record import ROUND_JOB
from assets.rounds import ROUND_ASSETS


def define_round_job(run_tags: dict[str, str] | None = None):
    """The round job; `run_tags` go on every run of it, whoever launches it (the UI's
    Launchpad, a sensor, the CLI)."""
    return dg.define_asset_job(
        ROUND_JOB,
        selection=dg.AssetSelection.assets(*ROUND_ASSETS),
        partitions_def=ROUNDS,
        description="One self-improvement round: generate -> critique -> filter -> train -> eval.",
        run_tags=run_tags,
    )


round_job = define_round_job()

__all__ = [
    "POLICY_ASSETS",
    "ROUNDS",
    "ROUND_ASSETS",
    "ROUND_CHECKS",
    "policy_automation_sensor",
    "define_round_job",
    "policy_job",
    "round_job",
]
