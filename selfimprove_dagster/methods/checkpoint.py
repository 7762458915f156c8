"""A round's training step: the recipe's training rows from `filtered`, the trainer of
its objective (`training.train_lora`), and what the step publishes.

    trained = train_round(recipe, store, "round_001", policy, parent, trained_from, ...)
    trained.manifest   # the checkpoint's manifest (adapter hash, parent, data version)
    trained.tables()   # checkpoints (one row), and for grpo/rloo rollouts + rl_steps

Online RL (grpo/rloo) trains inside this step too: every rollout the trainer samples is
caught by `grpo.RolloutRecorder` and written as table `rollouts`, one row per optimizer
step as `rl_steps` (see methods/grpo.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from selfimprove_dagster.methods import grpo
from selfimprove_dagster.methods import recipe as methods
from selfimprove_dagster.models import model_ref_identity
from selfimprove_dagster.progress import LogFn
from selfimprove_dagster.store.schemas import ROLLOUTS_TABLE, STEPS_TABLE
from selfimprove_dagster.store.storage import RoundStore
from selfimprove_dagster.training import RLParams, TrainParams, train_lora


@dataclass(frozen=True)
class TrainedRound:
    """What a round's training step produced."""

    manifest: dict[str, Any]  # as written next to the adapter
    row: dict[str, Any]  # the `checkpoints` table's one row
    rollouts: pl.DataFrame | None = None  # grpo/rloo: every rollout
    steps: pl.DataFrame | None = None  # grpo/rloo: one row per optimizer step

    def tables(self) -> dict[str, pl.DataFrame | None]:
        """The step's tables by name (None: not written, e.g. rollouts of an SFT round)."""
        return {
            "checkpoints": pl.DataFrame([self.row]),
            ROLLOUTS_TABLE: self.rollouts,
            STEPS_TABLE: self.steps,
        }


def train_round(
    recipe: methods.Recipe,
    store: RoundStore,
    round_: str,
    *,
    policy: str,
    parent: str | None,
    trained_from: str,
    params: TrainParams,
    rl: RLParams,
    base_model: str,
    init: str,
    log: LogFn | None = None,
) -> TrainedRound:
    """Train `round_`'s checkpoint on its `filtered` rows on top of `trained_from` (the
    round's policy, or the base model with init=restart) and publish it. The manifest
    names the policy, its parent round, the filtered data's content hash and version
    and the policy's identity, all verified whenever the checkpoint loads."""
    filtered = store.read(round_, "filtered")
    recorder = grpo.RolloutRecorder(round_, trained_from, rl)
    manifest = train_lora(
        recipe.objective,
        trained_from,
        methods.training_examples(recipe, filtered, store.read(round_, "prompts")),
        params,
        store.checkpoint_dir(round_),
        store.models_dir,
        manifest_extra={
            "round": round_,
            "base_model": base_model,
            "policy": policy,
            "parent_round": parent,
            "init": init,
            "method": recipe.name,
            "filtered_content_hash": methods.filtered_content_hash(filtered),
            # Identity, verified whenever the checkpoint loads (models.checkpoint_problem).
            "filtered_data_version": store.data_version(round_, "filtered"),
            "policy_identity": model_ref_identity(policy, store.models_dir),
        },
        log=log,
        after_train=recorder.collect if recipe.online else None,
    )
    return TrainedRound(
        manifest,
        checkpoint_row(round_, store, policy, manifest),
        recorder.rollouts if recipe.online else None,
        recorder.steps if recipe.online else None,
    )


def checkpoint_row(round_: str, store: RoundStore, policy: str, manifest: dict) -> dict:
    """The `checkpoints` table's row: where the checkpoint is, what identifies it."""
    return {
        "round": round_,
        "path": str(store.checkpoint_dir(round_)),
        "version": manifest["version"],
        "adapter_sha256": manifest["adapter_sha256"],
        "trained_from": manifest["trained_from"],
        "policy": policy,
        "content_hash": manifest["filtered_content_hash"],
        "filtered_data_version": manifest["filtered_data_version"],
        "train_examples": manifest["train_examples"],
        "optimizer_steps": manifest["optimizer_steps"],
        "planned_steps": manifest["planned_steps"],
        "final_loss": manifest["final_loss"],
    }
