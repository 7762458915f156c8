"""The online RL trainers: TRL GRPOTrainer / RLOOTrainer with LoRA, the round's
verifier as the reward (`verifiers.reward`), and every rollout caught as data.

How the rollouts are caught: both TRL trainers keep the last generation batch (prompt,
completion, one reward per reward function, advantage, and the extra columns our reward
function logs with `log_extra`) in a rolling log of one batch, which GRPO's
`log_completions` writes to `output_dir/completions/*.parquet` at each logging step.
With `logging_steps=1` and one generation batch per optimizer step that batch is
exactly the step's rollouts; a callback copies it at every log (`_RolloutLog`; RLOO has
no Parquet writer, so the callback serves both) into `trainer.rollout_log`, which
`methods.grpo.RolloutRecorder` turns into rows after training.

Generation inside the trainer: transformers on CPU (the default); with `use_vllm` (the
gpu profile) TRL's vLLM integration in colocate mode. TRL samples inside its own
training loop, so RL rollouts do not go through the round's engine pool.
"""

from __future__ import annotations

from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.text import last_message_text
from selfimprove_dagster.training.batching import longest_rl_tokens, micro_batch_size
from selfimprove_dagster.training.params import RL_ALGORITHMS, RLParams
from selfimprove_dagster.verifiers.reward import format_reward, make_verifier_reward


def rl_config_args(
    algorithm: str, rl: RLParams, common: dict[str, Any], micro_batch: int | None = None
) -> dict[str, Any]:
    """GRPOConfig / RLOOConfig arguments: `common` (the shared TrainingArguments of
    `training.trainers.trainer_args`) with the RL settings. Checked on CPU (TRL 1.16): bf16 and
    gradient checkpointing off, batch counted in completions, divisible by the group.

    `micro_batch` completions per forward pass (a divisor of the step's batch; default:
    the whole batch). TRL generates once per `steps_per_generation` micro-batches, which
    defaults to the accumulation steps: one generation batch (all of the step's
    rollouts, which `_RolloutLog` copies) still makes exactly one optimizer step, and
    only the forward and backward passes are split."""
    if rl.batch_size % rl.num_generations:
        raise SelfImproveError(
            f"RL batch of {rl.batch_size} completions does not divide by "
            f"num_generations={rl.num_generations}",
            "set rl_prompts_per_step and rl_num_generations (batch = their product)",
        )
    micro_batch = micro_batch or rl.batch_size
    if rl.batch_size % micro_batch:
        raise SelfImproveError(
            f"RL micro-batch of {micro_batch} completions does not divide the step's "
            f"batch of {rl.batch_size}",
            "set micro_batch_tokens instead (the micro-batch is then its largest "
            "divisor of the batch that fits)",
        )
    args = {k: v for k, v in common.items() if k not in ("max_length", "num_train_epochs")}
    args |= {
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": rl.batch_size // micro_batch,
        "max_steps": rl.steps,
        "num_generations": rl.num_generations,
        "max_completion_length": rl.max_completion_length,
        "temperature": rl.temperature,
        "top_k": rl.top_k,
        "beta": rl.beta,
        "log_completions": False,  # the rollouts are caught by `_RolloutLog` instead
        "use_vllm": rl.use_vllm,
    }
    if algorithm == "grpo":
        args["loss_type"] = rl.loss_type
    if rl.use_vllm:
        args |= {
            "vllm_mode": rl.vllm_mode,
            "vllm_gpu_memory_utilization": rl.vllm_gpu_memory_utilization,
        }
    if rl.format_reward_weight:
        args["reward_weights"] = [1.0, rl.format_reward_weight]
    return args | rl.extra


def rl_dataset(examples: list[dict[str, Any]]):
    """Conversational prompt rows with the columns the reward reads: every column of
    `examples` (the reference answer, the prompt id and the prompt's verifier columns:
    TRL hands each to the reward function)."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    return Dataset.from_list(
        [
            {
                **e,
                "prompt": [{"role": "user", "content": e["prompt"]}],
                "answer": str(e["answer"]),
            }
            for e in examples
        ]
    )


def rl_micro_batch(rl: RLParams, examples, tokenizer, token_budget: int) -> int:
    """Completions per forward pass: the largest divisor of the step's batch whose
    sequences (the longest prompt + `max_completion_length`) fit in `token_budget`
    tokens. Unsplit, one step of 32 CommonsenseQA rollouts peaked at 13.1 GB RSS on
    CPU, 7.1 GB in micro-batches of 16 (`benchmarks/bench_rl_memory.py`)."""
    longest = longest_rl_tokens(examples, rl.max_completion_length, tokenizer)
    return micro_batch_size(rl.batch_size, longest, token_budget)


def build_rl_trainer(
    algorithm: str,
    model,
    tokenizer,
    examples,
    rl: RLParams,
    common,
    lora,
    callbacks,
    token_budget: int | None = None,
):
    """A TRL GRPOTrainer / RLOOTrainer over `examples` with the LoRA config `lora`;
    forward passes split to fit `token_budget` tokens (None: the whole batch at once)."""
    if algorithm not in RL_ALGORITHMS:
        raise SelfImproveError(
            f"Unknown RL algorithm `{algorithm}`", f"use one of: {', '.join(RL_ALGORITHMS)}"
        )
    if rl.use_vllm:
        try:
            import vllm  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "rl_use_vllm needs vLLM: install the `vllm` extra on a GPU machine "
                "(pip install 'selfimprove-dagster[vllm]')"
            ) from error
    if algorithm == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    cut_off_at = rl.max_completion_length if rl.reject_cut_off else None
    rewards = [make_verifier_reward(rl.verifier, cut_off_at)]
    if rl.format_reward_weight:
        rewards.append(format_reward)
    micro = rl_micro_batch(rl, examples, tokenizer, token_budget) if token_budget else None
    config = Config(**rl_config_args(algorithm, rl, common, micro))
    trainer = Trainer(
        model=model,
        reward_funcs=rewards,
        args=config,
        train_dataset=rl_dataset(examples),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
    )
    trainer.rollout_log = []  # one dict of columns per optimizer step (see _RolloutLog)
    trainer.add_callback(_rollout_log_callback(trainer))
    return trainer


def _rollout_log_callback(trainer):
    """A callback that copies TRL's rolling log of the last generation batch (the
    step's rollouts) into `trainer.rollout_log` at every logging step."""
    from transformers import TrainerCallback

    class _RolloutLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "reward" not in (logs or {}):
                return  # the end-of-training summary
            batch = trainer._logs  # TRL's: what `log_completions` would write
            n = len(batch["prompt"])
            trainer.rollout_log.append(
                {
                    "step": [state.global_step] * n,
                    "prompt": [last_message_text(p) for p in batch["prompt"]],
                    "completion": [last_message_text(c) for c in batch["completion"]],
                    **{name: list(v) for name, v in batch["rewards"].items()},
                    **{name: list(v) for name, v in batch["extra"].items()},
                    "advantage": list(batch["advantages"]),
                }
            )

    return _RolloutLog()
