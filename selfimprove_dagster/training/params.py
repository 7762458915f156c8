"""Hyper-parameters of a round's training step (defaults: the recipe of the README's
demo, measured on the embedded model; the Dagster layer fills them from the trainer
settings)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from selfimprove_dagster.training.batching import MICRO_BATCH_TOKENS

OBJECTIVES = ("sft", "dpo", "grpo", "rloo")
RL_ALGORITHMS = ("grpo", "rloo")


@dataclass(frozen=True)
class RLParams:
    """Knobs of an online RL round (defaults: the trainer settings' `rl_*`)."""

    steps: int = 8  # optimizer steps (each: prompts_per_step prompts x num_generations)
    prompts_per_step: int = 4  # prompts per optimizer step
    num_generations: int = 4  # rollouts per prompt (the group advantages are computed in)
    max_completion_length: int = 16  # new tokens per rollout
    temperature: float = 0.8  # rollout sampling temperature
    top_k: int = 50  # rollout top-k
    beta: float = 0.04  # KL pull to the start policy (adapter off); 0 skips the ref forward
    loss_type: str = "dapo"  # TRL GRPO loss (grpo, dapo, dr_grpo, bnpo); RLOO ignores it
    format_reward_weight: float = 0.0  # weight of `format_reward` (0: verifier only)
    prompt_filter: str = "signal_first"  # which train prompts (`methods.grpo.select_rl_prompts`)
    use_vllm: bool = False  # generate rollouts with vLLM (gpu profile), else transformers
    vllm_mode: str = "colocate"  # TRL vLLM mode: colocate (same process) or server
    vllm_gpu_memory_utilization: float = 0.3  # colocate: the GPU share vLLM may take
    verifier: str | None = None  # verifier name for every row (None: the row's, or numeric)
    # Rationale rounds: a rollout that used all `max_completion_length` tokens was cut
    # off, and a number the verifier's last-resort search finds in it earns no reward
    # (reason cut_off, as in the critiques): else RL would pay for unfinished reasoning.
    reject_cut_off: bool = False
    extra: dict = field(default_factory=dict)  # further GRPOConfig / RLOOConfig arguments

    @property
    def batch_size(self) -> int:
        """Completions per optimizer step (TRL counts completions, not prompts)."""
        return self.prompts_per_step * self.num_generations

    @property
    def n_prompts(self) -> int:
        """Prompts one round trains on (each seen once)."""
        return self.steps * self.prompts_per_step


@dataclass(frozen=True)
class TrainParams:
    """LoRA hyper-parameters (defaults: the demo's recipe, README "What the demo shows")."""

    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA path
    learning_rate: float = 3e-4  # AdamW peak learning rate
    epochs: int = 2  # passes over the filtered set
    batch_size: int = 16  # examples per optimizer step
    # Tokens per forward pass (SFT, DPO, GRPO, RLOO): see `batching.micro_batch_size`.
    micro_batch_tokens: int = MICRO_BATCH_TOKENS
    max_length: int = 512  # truncate longer prompt+completion sequences
    seed: int = 0  # data order and LoRA init
    beta: float = 0.1  # DPO only: strength of the pull towards the reference policy
    device: str = "cpu"  # "cpu" or "cuda" (the gpu and cluster profiles)
    rl: RLParams | None = None  # grpo / rloo only (steps, group size, ...)

    def planned_steps(self, n_examples: int) -> int:
        if self.rl is not None:  # online RL runs a fixed number of steps
            return self.rl.steps
        return math.ceil(n_examples / self.batch_size) * self.epochs
