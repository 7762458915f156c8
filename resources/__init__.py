"""Dagster resources: the knobs of a round and the engines they build.

Each resource is a thin `dg.ConfigurableResource` over the core library. Every field
has a default and a description (shown in the Dagster UI). A loop's settings are one
resource per group (`settings.GROUPS`), resolved by `settings.resolve_settings` from the
loop's YAML, the environment (`SELFIMPROVE_<FIELD>` for the demo loop) and run config.
"""

from resources.env import ENV_PREFIX
from resources.evolution import EvolutionResource
from resources.gates import GatesResource
from resources.generator import GeneratorResource
from resources.method import MethodResource
from resources.storage import StorageResource
from resources.task import TaskResource
from resources.trainer import TrainerResource

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
