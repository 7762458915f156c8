"""The TRL trainer of each objective, configured for this CPU (fp32, no gradient
checkpointing) with a LoRA adapter.

- `sft` (STaR, self-consistency, Self-Refine): `SFTTrainer` on conversational
  prompt-completion rows (completion-only loss).
- `dpo` (Self-Rewarding / Self-Judge): `DPOTrainer` on (prompt, chosen, rejected)
  pairs; with a LoRA adapter the reference model is the same network with the adapter
  switched off, i.e. the round's policy, as in Self-Rewarding.
- `grpo` / `rloo` (online RL): `training.rl.build_rl_trainer`.
"""

from __future__ import annotations

from pathlib import Path

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.training.batching import longest_example_tokens, micro_batch_size
from selfimprove_dagster.training.data import dpo_dataset, sft_dataset
from selfimprove_dagster.training.params import OBJECTIVES, RLParams, TrainParams
from selfimprove_dagster.training.rl import build_rl_trainer


def trainer_args(params: TrainParams, output_dir: Path, micro_batch: int | None = None) -> dict:
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


def lora_config(params: TrainParams):
    """The adapter every objective trains: LoRA on all linear layers."""
    from peft import LoraConfig

    return LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def build_trainer(objective, model, tokenizer, examples, params, output_dir, callbacks):
    """The TRL trainer for `objective` over `examples`, long batches split to fit
    `params.micro_batch_tokens` tokens per forward pass."""
    if objective not in OBJECTIVES:
        raise SelfImproveError(
            f"Unknown training objective `{objective}`", f"use one of: {', '.join(OBJECTIVES)}"
        )
    lora = lora_config(params)
    if objective in ("grpo", "rloo"):
        return build_rl_trainer(
            objective,
            model,
            tokenizer,
            examples,
            params.rl or RLParams(),
            trainer_args(params, output_dir),
            lora,
            callbacks,
            token_budget=params.micro_batch_tokens,
        )
    longest = longest_example_tokens(objective, examples, tokenizer)
    micro = micro_batch_size(params.batch_size, longest, params.micro_batch_tokens)
    common = {"processing_class": tokenizer, "peft_config": lora, "callbacks": callbacks}
    if objective == "sft":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**trainer_args(params, output_dir, micro))
        return SFTTrainer(model=model, args=config, train_dataset=sft_dataset(examples), **common)
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(**trainer_args(params, output_dir, micro), beta=params.beta)
    # ref_model=None + a LoRA config: the reference is the adapter-free policy.
    return DPOTrainer(model=model, args=config, train_dataset=dpo_dataset(examples), **common)
