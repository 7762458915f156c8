"""Generation engines behind one contract (see `base.GenerationEngine`).

`make_engine(name, ...)` is the registry: a config string names the backend. Backends
import their heavy libraries only when constructed.
"""

from __future__ import annotations

from pathlib import Path

from selfimprove_dagster.engines.base import Completion, GenerationEngine, Sampling
from selfimprove_dagster.errors import SelfImproveError

ENGINES = ("transformers",)


def make_engine(
    name: str, model_ref: str, models_dir: Path, batch_size: int = 64, torch_threads: int = 0
) -> GenerationEngine:
    """Build the engine `name` for `model_ref` (a model reference, see models.py)."""
    if name == "transformers":
        from selfimprove_dagster.engines.transformers_engine import TransformersEngine

        return TransformersEngine(
            model_ref, models_dir, batch_size=batch_size, torch_threads=torch_threads
        )
    raise SelfImproveError(
        f"Unknown generation engine `{name}`", f"use one of: {', '.join(ENGINES)}"
    )


__all__ = ["ENGINES", "Completion", "GenerationEngine", "Sampling", "make_engine"]
