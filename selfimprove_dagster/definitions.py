"""Composition root: the Dagster `Definitions` of the code location (workspace.yaml).

Resources are built from `SELFIMPROVE_<FIELD>` environment variables over their
defaults (see `resources.from_env`), so the UI, the CLI and deployments share one recipe.
"""

from __future__ import annotations

import dagster as dg

from assets import (
    POLICY_ASSETS,
    ROUND_ASSETS,
    ROUND_CHECKS,
    define_round_job,
    policy_automation_sensor,
    policy_job,
)
from assets.record import SETTINGS_TAG, settings_fingerprint
from assets.sensors import EVOLUTION_SCHEDULES, EVOLUTION_SENSORS
from resources import (
    EvolutionResource,
    GatesResource,
    GeneratorResource,
    MethodResource,
    StorageResource,
    TaskResource,
    TrainerResource,
    from_env,
)
from resources.env import check_environment
from selfimprove_dagster.profiles import Profile, active_profile


def executor_for(profile: Profile) -> dg.ExecutorDefinition:
    """The profile's executor: in-process, or dagster-k8s's k8s_job_executor (a pod per
    step, per-asset resources from `per_step_k8s_config`; extra `[cluster]`)."""
    if profile.executor == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError:
            from selfimprove_dagster.errors import SelfImproveError

            raise SelfImproveError(
                "The cluster profile needs dagster-k8s and dagster-postgres",
                "pip install -e '.[cluster]' (`make install` does)",
            ) from None
        return k8s_job_executor.configured(dict(profile.k8s_executor_config))
    # Steps are heavy (a model load each); a process per step costs seconds on 2 cores.
    return dg.in_process_executor


def build_definitions() -> dg.Definitions:
    check_environment()  # a misspelled SELFIMPROVE_* name is an error, not ignored
    profile = active_profile()  # SELFIMPROVE_PROFILE: local (default), gpu, cluster
    resources = {
        "storage": from_env(StorageResource, **profile.resource_defaults("storage")),
        "task": from_env(TaskResource),
        "generator": from_env(GeneratorResource, **profile.resource_defaults("generator")),
        "trainer": from_env(TrainerResource, **profile.resource_defaults("trainer")),
        "method": from_env(MethodResource),
        "gates": from_env(GatesResource),
        "evolution": from_env(EvolutionResource),
    }
    # Every round run carries the settings it ran with, so a failed one launched from
    # the UI or by a sensor is resumed by `selfimprove run` when the settings match.
    round_job = define_round_job(run_tags={SETTINGS_TAG: settings_fingerprint(resources)})
    return dg.Definitions(
        assets=[*ROUND_ASSETS, *POLICY_ASSETS],
        asset_checks=ROUND_CHECKS,
        jobs=[round_job, policy_job],
        sensors=[*EVOLUTION_SENSORS, policy_automation_sensor],
        schedules=EVOLUTION_SCHEDULES,
        resources=resources,
        executor=executor_for(profile),
    )


defs = build_definitions()
