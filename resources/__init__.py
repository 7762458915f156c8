"""Dagster resources: the knobs of a round and the engines they build.

Each resource is a thin `dg.ConfigurableResource` over the core library. Every field
has a default and a description (shown in the Dagster UI). `from_env(cls)` builds a
resource whose fields are overridden by `SELFIMPROVE_<FIELD>` environment variables,
which is how the CLI, the Makefile and deployments pick a recipe without editing code.
"""

from resources.env import ENV_PREFIX, from_env
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
    "from_env",
]
