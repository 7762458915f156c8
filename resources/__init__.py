"""Dagster resources: the knobs of a round and the engines they build.

Each resource is a thin `dg.ConfigurableResource` over the core library. Every field
has a default and a description (shown in the Dagster UI). A loop's settings are one
resource per group (`settings.GROUPS`), resolved by `settings.resolve_settings` from the
loop's YAML, the environment (`SELFIMPROVE_<FIELD>` for the demo loop) and run config.
"""

from selfimprove_dagster.resources.env import ENV_PREFIX
from selfimprove_dagster.resources.evolution import EvolutionResource
from selfimprove_dagster.resources.gates import GatesResource
from selfimprove_dagster.resources.generator import GeneratorResource
from selfimprove_dagster.resources.method import MethodResource
from selfimprove_dagster.resources.storage import StorageResource
from selfimprove_dagster.resources.task import TaskResource
from selfimprove_dagster.resources.trainer import TrainerResource

__all__ = [
    "ENV_PREFIX",
    "EvolutionResource",
    "GatesResource",
    "GeneratorResource",
    "MethodResource",
    "StorageResource",
    "TaskResource",
    "TrainerResource",
]
