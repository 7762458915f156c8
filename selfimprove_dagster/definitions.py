"""Composition root: the Dagster `Definitions` of this repository's code location.

A `dg` project of loops: every `defs/<loop>/defs.yaml` under `selfimprove_dagster/defs/`
is a `SelfImproveLoop` component (selfimprove_dagster/components.py), loaded with
`dg.load_from_defs_folder`; on top of them the `experiments` asset compares the loops,
and the profile (SELFIMPROVE_PROFILE: local, gpu, cluster) picks the executor.
workspace.yaml, `dg`, `selfimprove` and the tests all load `build_definitions()`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import dagster as dg

from selfimprove_dagster.assets import loops_of
from selfimprove_dagster.assets.experiments import experiments_definitions
from selfimprove_dagster.profiles import Profile, active_profile
from selfimprove_dagster.resources.env import check_environment

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def executor_for(profile: Profile, loops: list[str]) -> dg.ExecutorDefinition:
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
        return k8s_job_executor.configured(profile.executor_config_for(loops))
    # Steps are heavy (a model load each); a process per step costs seconds on 2 cores.
    return dg.in_process_executor


def with_experiments(loops: dg.Definitions, profile: Profile) -> dg.Definitions:
    """Loops' definitions plus the cross-loop `experiments` asset and the executor."""
    repository = cache(loops.get_repository_def)
    names = list(loops_of(loops))
    return dg.Definitions.merge(
        loops,
        experiments_definitions(loops_of(loops), repository),
        dg.Definitions(executor=executor_for(profile, names)),
    )


def build_definitions() -> dg.Definitions:
    check_environment()  # a misspelled SELFIMPROVE_* name is an error, not ignored
    loops = dg.load_from_defs_folder(project_root=PROJECT_ROOT)
    return with_experiments(loops, active_profile())


@dg.definitions
def defs() -> dg.Definitions:
    """What workspace.yaml and `dg` load."""
    return build_definitions()
