"""Fine-tuning a round's policy: load it, train a LoRA adapter with the objective's TRL
trainer (`training.trainers`), publish the adapter as the round's checkpoint
(`training.checkpoint`). Runs on CPU in fp32.

    manifest = train_lora("sft", policy, rows, TrainParams(), out_dir, models_dir)
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.models import (
    load_model,
    load_tokenizer,
    model_ref_identity,
    resolved_model_ref,
)
from selfimprove_dagster.progress import LogFn, Progress
from selfimprove_dagster.store.versions import staging_dir
from selfimprove_dagster.training.checkpoint import (
    library_versions,
    portable_ref,
    publish_checkpoint,
    save_adapter,
)
from selfimprove_dagster.training.params import TrainParams
from selfimprove_dagster.training.trainers import build_trainer


def _progress_callback(progress: Progress):
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            progress.update(1)

    return ProgressCallback()


def train_lora_sft(
    trained_from: str,
    examples: list[dict[str, str]],
    params: TrainParams,
    out_dir: Path,
    models_dir: Path,
    manifest_extra: dict[str, Any] | None = None,
    log: LogFn | None = None,
) -> dict[str, Any]:
    """LoRA SFT on `examples` (dicts with `prompt` and `completion`); see `train_lora`."""
    return train_lora(
        "sft", trained_from, examples, params, out_dir, models_dir, manifest_extra, log
    )


def train_lora(
    objective: str,
    trained_from: str,
    examples: list[dict[str, str]],
    params: TrainParams,
    out_dir: Path,
    models_dir: Path,
    manifest_extra: dict[str, Any] | None = None,
    log: LogFn | None = None,
    after_train: Callable[[Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter with `objective` ("sft": dicts with `prompt`, `completion`;
    "dpo": dicts with `prompt`, `chosen`, `rejected`; "grpo"/"rloo": prompt rows with
    the columns their verifier reads).

    `trained_from` is the model reference the adapter sits on; the checkpoint loads as
    that model with the adapter merged. `after_train(trainer)` may read what the trainer
    left (RL: its rollouts); its dict joins the manifest. Returns the manifest written
    next to the adapter.
    """
    if not examples:
        raise SelfImproveError(
            "Cannot train on an empty filtered set",
            "sample more (samples_per_prompt, temperature) or use more prompts",
        )
    trained_from = resolved_model_ref(trained_from)  # `./my-model` means the same later
    tokenizer = load_tokenizer(trained_from, models_dir)
    model = load_model(trained_from, models_dir)
    tmp = staging_dir(out_dir)  # unique per writer; removed if training or saving fails
    planned = params.planned_steps(len(examples))
    started = time.monotonic()
    try:
        with Progress(
            f"train ({objective})", planned, log=log, unit="steps", log_every_s=15.0
        ) as bar:
            trainer = build_trainer(
                objective, model, tokenizer, examples, params, tmp / "trainer",
                [_progress_callback(bar)],
            )  # fmt: skip
            result = trainer.train()
        collected = after_train(trainer) if after_train is not None else {}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    save_adapter(trainer, tokenizer, tmp)
    manifest = {
        "objective": objective,
        "trained_from": portable_ref(trained_from, out_dir),
        "parent": model_ref_identity(trained_from, models_dir),  # verified on load
        "train_examples": len(examples),
        "hyper_parameters": asdict(params),
        "planned_steps": planned,
        "optimizer_steps": int(trainer.state.global_step),
        # sequences per forward pass (< batch_size: long sequences, accumulated)
        "micro_batch": int(trainer.args.per_device_train_batch_size),
        "final_loss": losses[-1] if losses else None,
        "mean_loss": float(result.training_loss),
        "train_seconds": round(time.monotonic() - started, 2),
        "library_versions": library_versions(),
        **(manifest_extra or {}),
        **collected,
    }
    return publish_checkpoint(tmp, out_dir, manifest)
