"""Dagster resources: the knobs of a round and the engines they build.

Each resource is a thin `dg.ConfigurableResource` over the core library. Every field
has a default and a description (shown in the Dagster UI). `from_env(cls)` builds a
resource whose fields are overridden by `SELFIMPROVE_<FIELD>` environment variables,
which is how the CLI, the Makefile and deployments pick a recipe without editing code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

import dagster as dg
import polars as pl
from pydantic import Field, ValidationError

from selfimprove_dagster.engines import GenerationEngine, Sampling, make_engine
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.evolution import StopRules
from selfimprove_dagster.models import DEFAULT_MODEL
from selfimprove_dagster.storage import RoundStore
from selfimprove_dagster.training import TrainParams

ENV_PREFIX = "SELFIMPROVE_"
R = TypeVar("R", bound=dg.ConfigurableResource)


def from_env(cls: type[R], **fixed: object) -> R:
    """`cls(...)` with each field taken from `SELFIMPROVE_<FIELD>` when that is set."""
    values: dict[str, object] = {}
    for name in cls.model_fields:
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            # pydantic coerces "3" -> 3, "0.8" -> 0.8, "true" -> True; lists are "0.6,0.8".
            is_list = getattr(cls.model_fields[name].annotation, "__origin__", None) is list
            values[name] = raw.split(",") if is_list else raw
    values.update(fixed)
    try:
        return cls(**values)
    except ValidationError as error:
        bad = ", ".join(
            f"{ENV_PREFIX}{str(e['loc'][0]).upper()}={e.get('input')!r} ({e['msg']})"
            for e in error.errors()
        )
        raise SelfImproveError(
            f"Invalid setting for {cls.__name__}: {bad}",
            "set the environment variable to a value of the field's type (see README, "
            "Configuration)",
        ) from None


class StorageResource(dg.ConfigurableResource):
    """Where rounds, checkpoints, converted models and the DuckDB catalog live."""

    data_dir: str = Field(default="var", description="Data dir (relative to the working dir).")

    def store(self) -> RoundStore:
        return RoundStore(Path(self.data_dir).expanduser().resolve())


class TaskResource(dg.ConfigurableResource):
    """Which problems the loop trains on and how the held-out set is scored."""

    task: str = Field(
        default="addition_2digit",
        description="Built-in task (addition_2digit, word_problems); ignored with dataset_path.",
    )
    dataset_path: str = Field(
        default="",
        description="A .jsonl/.parquet file with prompt+answer (or GSM8K's question+answer).",
    )
    n_train: int = Field(default=200, description="Train prompts sampled each round.")
    n_eval: int = Field(default=200, description="Held-out prompts (never trained on).")
    seed: int = Field(default=0, description="Seed of the problem draw and split.")
    eval_samples_per_prompt: int = Field(
        default=4, description="k for held-out pass@k (0 = greedy accuracy only)."
    )
    pass_at_k_prompts: int = Field(
        default=50, description="Held-out prompts sampled k times for pass@k."
    )

    def problems(self) -> pl.DataFrame:
        from selfimprove_dagster.tasks import load_dataset_file, make_task

        if self.dataset_path:
            return load_dataset_file(self.dataset_path, self.n_train, self.n_eval, self.seed)
        return make_task(self.task, self.n_train, self.n_eval, self.seed)


class GeneratorResource(dg.ConfigurableResource):
    """The generation engine and how it samples (STaR: k samples per prompt)."""

    engine: str = Field(default="transformers", description="Generation backend.")
    base_model: str = Field(
        default=DEFAULT_MODEL,
        description="Round 0 policy: embedded:<name>, a HF folder or a checkpoint folder.",
    )
    samples_per_prompt: int = Field(default=4, description="k samples per train prompt.")
    temperature: float = Field(default=0.8, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(default=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=50, description="Sample among the top-k tokens (0 = off).")
    max_new_tokens: int = Field(default=16, description="Completion budget in tokens.")
    batch_size: int = Field(default=64, description="Rows per generate() batch.")
    torch_threads: int = Field(
        default=0, description="torch threads (0 = torch's default; 1 if cores are busy)."
    )
    seed: int = Field(default=0, description="Sampling seed (the round index is added).")

    def sampling(self, round_index: int = 0) -> Sampling:
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed + round_index,  # fresh samples every round, reproducible
        )

    def load(self, model_ref: str, models_dir: Path) -> GenerationEngine:
        return make_engine(
            self.engine,
            model_ref,
            models_dir,
            batch_size=self.batch_size,
            torch_threads=self.torch_threads,
        )


class TrainerResource(dg.ConfigurableResource):
    """How a round's filtered samples become its checkpoint (TRL SFT + PEFT LoRA)."""

    init: str = Field(
        default="continue",
        description="continue: train on top of the round's policy; "
        "restart: train the base model every round (ReST-EM).",
    )
    max_per_prompt: int = Field(
        default=1, description="Cap on kept samples per prompt (keeps training cost flat)."
    )
    lora_r: int = Field(default=16, description="LoRA rank.")
    lora_alpha: int = Field(default=32, description="LoRA alpha.")
    learning_rate: float = Field(default=3e-4, description="AdamW learning rate.")
    epochs: int = Field(default=2, description="Epochs over the filtered set.")
    batch_size: int = Field(default=16, description="Examples per optimizer step.")
    seed: int = Field(default=0, description="Training seed.")

    def params(self) -> TrainParams:
        return TrainParams(
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            learning_rate=self.learning_rate,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def trained_from(self, policy: str, base_model: str) -> str:
        """The model the round's adapter is trained on top of."""
        if self.init == "continue":
            return policy
        if self.init == "restart":
            return base_model
        raise SelfImproveError(f"Unknown trainer init `{self.init}`", "use `continue` or `restart`")


class GatesResource(dg.ConfigurableResource):
    """Thresholds of the round's quality gates (blocking) and health monitors (WARN)."""

    min_filtered: int = Field(
        default=1, description="Fewest filtered rows a round may train on (blocking)."
    )
    regression_tolerance: float = Field(
        default=0.05,
        description="Largest held-out accuracy drop vs the round's policy allowed (blocking).",
    )
    near_duplicate_threshold: float = Field(
        default=0.9,
        description="Similarity at which a train prompt counts as a copy of an eval prompt.",
    )
    max_exploration_drop: float = Field(
        default=0.5, description="WARN when pass@k or distinct correct answers fall this much."
    )


class EvolutionResource(dg.ConfigurableResource):
    """When the loop stops by itself, and which checkpoint generates the next round."""

    max_rounds: int = Field(default=4, description="Completed rounds after which the loop stops.")
    patience: int = Field(
        default=2, description="Stop after this many rounds in a row without improvement."
    )
    min_improvement: float = Field(
        default=0.005,
        description="Held-out accuracy gain over the best so far that counts as improvement.",
    )
    stop_on_regression: bool = Field(
        default=True, description="Stop when the latest round scored below its policy."
    )
    regression_tolerance: float = Field(
        default=0.02,
        description="Accuracy drop the stop rule does not count as a regression (held-out "
        "noise); promotion never takes a round that scored below its policy.",
    )
    policy: Literal["latest", "best"] = Field(
        default="best",
        description="Checkpoint that generates the next round: the latest round's, or the "
        "promoted one (best held-out accuracy among rounds that did not regress).",
    )

    auto_temperature: bool = Field(
        default=False,
        description="B-STaR: pick each round's sampling temperature from the previous "
        "round's monitors (exploration vs exploitation) instead of a fixed one.",
    )
    temperature_grid: list[float] = Field(
        default=[0.6, 0.8, 1.0, 1.2],
        description="Temperatures auto_temperature compares (balance score at each).",
    )
    tuning_prompts: int = Field(
        default=50, description="Train prompts sampled per grid temperature when tuning."
    )

    def rules(self) -> StopRules:
        return StopRules(
            max_rounds=self.max_rounds,
            patience=self.patience,
            min_improvement=self.min_improvement,
            stop_on_regression=self.stop_on_regression,
            regression_tolerance=self.regression_tolerance,
        )
