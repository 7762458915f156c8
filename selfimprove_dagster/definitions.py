"""Composition root: the Dagster `Definitions` of the code location (workspace.yaml).

Resources are built from `SELFIMPROVE_<FIELD>` environment variables over their
defaults (see `resources.from_env`), so the UI, the CLI and deployments share one recipe.
"""

from __future__ import annotations

import dagster as dg

from assets import ROUND_ASSETS, ROUND_CHECKS, round_job
from assets.sensors import EVOLUTION_SCHEDULES, EVOLUTION_SENSORS
from resources import (
    EvolutionResource,
    GatesResource,
    GeneratorResource,
    StorageResource,
    TaskResource,
    TrainerResource,
    from_env,
)


def build_definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=ROUND_ASSETS,
        asset_checks=ROUND_CHECKS,
        jobs=[round_job],
        sensors=EVOLUTION_SENSORS,
        schedules=EVOLUTION_SCHEDULES,
        resources={
            "storage": from_env(StorageResource),
            "task": from_env(TaskResource),
            "generator": from_env(GeneratorResource),
            "trainer": from_env(TrainerResource),
            "gates": from_env(GatesResource),
            "evolution": from_env(EvolutionResource),
        },
        # Steps are heavy (a model load each); a process per step costs seconds on 2 cores.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
