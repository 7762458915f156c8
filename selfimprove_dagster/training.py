"""Fine-tuning a round's policy on its filtered samples: TRL + PEFT LoRA on CPU.

Two objectives, picked by the round's method (`methods.Recipe.objective`):

- `sft` (STaR, self-consistency, Self-Refine): TRL `SFTTrainer` on conversational
  prompt-completion rows (user prompt, assistant completion), for which TRL computes
  the loss on the completion tokens only.
- `dpo` (Self-Rewarding / Self-Judge): TRL `DPOTrainer` on (prompt, chosen, rejected)
  pairs. With a LoRA adapter the reference model is the same network with the adapter
  switched off, i.e. the round's policy, as in Self-Rewarding.

The adapter, the
tokenizer and a manifest (what was trained on what, with which settings, and the
content hashes that identify the adapter and its parent) are written to a unique
temporary folder and published with one atomic swap (`publish_checkpoint`), so a
failed or killed run leaves the previous checkpoint, never half of a new one.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.models import (
    CHECKPOINT_MANIFEST,
    adapter_sha256,
    load_model,
    load_tokenizer,
    model_ref_identity,
    resolved_model_ref,
)
from selfimprove_dagster.progress import LogFn, Progress
from selfimprove_dagster.store.versions import publish_dir, staging_dir

# Peak training memory grows with sequences per forward pass x their length x the
# vocabulary: the logits and their gradient dominate (SmolLM2's vocabulary is 49,152
# tokens, so 16 sequences of 400 tokens hold 1.3 GB per copy of the logits; a GSM8K
# rationale round with batch 16 was OOM-killed at 12 GB RSS). A batch of long sequences
# is split into micro-batches accumulated into the same optimizer step, so the update
# (`batch_size` examples) and the step count stay what they were.
MICRO_BATCH_TOKENS = 2048
# Tokens the chat template adds to a prompt (role markers), counted into its length.
TEMPLATE_OVERHEAD_TOKENS = 16


def micro_batch_size(batch_size: int, longest_tokens: int, token_budget: int) -> int:
    """Sequences per forward pass: the largest divisor of `batch_size` whose micro-batch
    of `longest_tokens`-token sequences fits in `token_budget` tokens (at least 1). A
    divisor, so gradient accumulation adds up to exactly `batch_size` examples."""
    fits = max(1, token_budget // max(1, longest_tokens))
    return max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fits)


def longest_example_tokens(objective: str, examples: list[dict[str, str]], tokenizer) -> int:
    """Tokens in the longest training sequence (the chat template's few extra tokens
    included). DPO runs chosen and rejected in one forward pass: both count."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    if objective == "dpo":
        lengths = [
            2 * count(e["prompt"]) + count(e["chosen"]) + count(e["rejected"]) for e in examples
        ]
    else:
        lengths = [count(e["prompt"]) + count(e["completion"]) for e in examples]
    return max(lengths, default=0) + TEMPLATE_OVERHEAD_TOKENS


@dataclass(frozen=True)
class TrainParams:
    """LoRA SFT hyper-parameters (defaults: the recipe measured in DESIGN.md)."""

    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA path
    learning_rate: float = 3e-4  # AdamW peak learning rate
    epochs: int = 2  # passes over the filtered set
    batch_size: int = 16  # examples per optimizer step
    # Tokens per forward pass (SFT, DPO, GRPO, RLOO): see `micro_batch_size`.
    micro_batch_tokens: int = MICRO_BATCH_TOKENS
    max_length: int = 512  # truncate longer prompt+completion sequences
    seed: int = 0  # data order and LoRA init
    beta: float = 0.1  # DPO only: strength of the pull towards the reference policy
    device: str = "cpu"  # "cpu" or "cuda" (the gpu and cluster profiles)
    rl: Any = None  # grpo / rloo only: methods.grpo.RLParams (steps, group size, ...)

    def planned_steps(self, n_examples: int) -> int:
        if self.rl is not None:  # online RL runs a fixed number of steps
            return self.rl.steps
        return math.ceil(n_examples / self.batch_size) * self.epochs


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "selfimprove-dagster"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def portable_ref(ref: str, out_dir: Path) -> str:
    """Store a sibling checkpoint as `../round_N`, so the data dir can be moved."""
    path = Path(ref)
    if path.is_absolute() and path.parent == out_dir.resolve().parent:
        return f"../{path.name}"
    return ref


OBJECTIVES = ("sft", "dpo", "grpo", "rloo")


def sft_dataset(examples: list[dict[str, str]]):
    """Conversational prompt-completion rows -> a `datasets.Dataset`."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # tokenizing a few hundred rows takes < 1 s; keep the log clean

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": e["prompt"]}],
                "completion": [{"role": "assistant", "content": e["completion"]}],
            }
            for e in examples
        ]
    )


def dpo_dataset(pairs: list[dict[str, str]]):
    """Conversational preference rows (prompt, chosen, rejected) -> a `datasets.Dataset`."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            for p in pairs
        ]
    )


def _progress_callback(progress: Progress):
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            progress.update(1)

    return ProgressCallback()


def _trainer_args(params: TrainParams, output_dir: Path, micro_batch: int | None = None):
    """Settings SFTConfig and DPOConfig share (both are TrainingArguments); `micro_batch`
    sequences per forward pass, accumulated into `params.batch_size` per step."""
    micro_batch = micro_batch or params.batch_size
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": params.epochs,
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": params.batch_size // micro_batch,
        "learning_rate": params.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_length": params.max_length,
        "seed": params.seed,
        "bf16": False,  # fp32: no fast bf16 on CPU (TRL defaults it on); same on GPU
        "gradient_checkpointing": False,  # TRL's default; it only costs time on a 135M model
        "use_cpu": params.device == "cpu",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,  # our Progress shows the bar and writes the run-log lines
    }


def _build_trainer(objective: str, model, tokenizer, examples, params, output_dir, callbacks):
    from peft import LoraConfig

    lora = LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    common = {"processing_class": tokenizer, "peft_config": lora, "callbacks": callbacks}
    if objective in ("sft", "dpo"):
        longest = longest_example_tokens(objective, examples, tokenizer)
        micro = micro_batch_size(params.batch_size, longest, params.micro_batch_tokens)
    if objective == "sft":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**_trainer_args(params, output_dir, micro))
        return SFTTrainer(model=model, args=config, train_dataset=sft_dataset(examples), **common)
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**_trainer_args(params, output_dir, micro), beta=params.beta)
        # ref_model=None + a LoRA config: the reference is the adapter-free policy.
        return DPOTrainer(model=model, args=config, train_dataset=dpo_dataset(examples), **common)
    if objective in ("grpo", "rloo"):  # online RL: the trainer lives in methods.grpo
        from selfimprove_dagster.methods.grpo import RLParams, build_rl_trainer

        common = _trainer_args(params, output_dir)
        rl = params.rl or RLParams()
        return build_rl_trainer(
            objective,
            model,
            tokenizer,
            examples,
            rl,
            common,
            lora,
            callbacks,
            token_budget=params.micro_batch_tokens,
        )
    raise SelfImproveError(
        f"Unknown training objective `{objective}`", f"use one of: {', '.join(OBJECTIVES)}"
    )


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
    "dpo": dicts with `prompt`, `chosen`, `rejected`).

    `trained_from` is the model reference the adapter sits on; the checkpoint loads as
    that model with the adapter merged. Returns the manifest written next to the adapter.
    """
    if not examples:
        raise SelfImproveError(
            "Cannot train on an empty filtered set",
            "sample more (samples_per_prompt, temperature) or use more prompts",
        )
    trained_from = resolved_model_ref(trained_from)  # `./my-model` means the same later
    tokenizer = load_tokenizer(trained_from, models_dir)
    model = load_model(trained_from, models_dir)
    tmp = staging_dir(out_dir)  # unique per writer; removed if training fails
    planned = params.planned_steps(len(examples))
    started = time.monotonic()
    with Progress(f"train ({objective})", planned, log=log, unit="steps", log_every_s=15.0) as bar:
        callbacks = [_progress_callback(bar)]
        trainer = _build_trainer(
            objective, model, tokenizer, examples, params, tmp / "trainer", callbacks
        )
        try:
            result = trainer.train()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    # A hook that reads what the trainer left (RL: its rollouts); its dict joins the manifest.
    collected = after_train(trainer) if after_train is not None else {}
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    trainer.model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
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


def publish_checkpoint(
    tmp_dir: Path, out_dir: Path, manifest: dict[str, Any], run_id: str | None = None
) -> dict[str, Any]:
    """Publish a trained adapter folder `tmp_dir` (from `staging_dir(out_dir)`) as the
    current checkpoint at `out_dir`: records the adapter's content hash in the manifest,
    writes it, and swaps `out_dir` to the new folder in one atomic step. Every trainer
    (SFT, DPO, GRPO) ends here. Returns the manifest as written."""
    shutil.rmtree(tmp_dir / "trainer", ignore_errors=True)
    manifest = {**manifest, "adapter_sha256": adapter_sha256(tmp_dir)}
    (tmp_dir / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    version = publish_dir(tmp_dir, out_dir, run_id)
    return {**manifest, "version": version.name.partition("@")[2]}
