"""Fine-tuning a round's policy with TRL + PEFT LoRA (CPU: fp32).

    params      TrainParams, RLParams: the hyper-parameters
    batching    sequences per forward pass under a token budget
    data        training rows -> TRL datasets
    trainers    the TRL trainer of each objective (sft, dpo; rl for grpo/rloo)
    rl          GRPOTrainer / RLOOTrainer with the verifier reward; rollouts caught
    lora        train_lora: load, train, publish
    checkpoint  publish_checkpoint: adapter + manifest, one atomic swap

Nothing here knows the recipes (`methods/`): a recipe hands over its rows and an
objective; `methods.checkpoint.train_round` is the round's training step.
"""

from selfimprove_dagster.training.batching import micro_batch_size
from selfimprove_dagster.training.checkpoint import publish_checkpoint
from selfimprove_dagster.training.lora import train_lora, train_lora_sft
from selfimprove_dagster.training.params import OBJECTIVES, RLParams, TrainParams

__all__ = [
    "OBJECTIVES",
    "RLParams",
    "TrainParams",
    "micro_batch_size",
    "publish_checkpoint",
    "train_lora",
    "train_lora_sft",
]
