"""How a round's checkpoint is trained (LoRA hyper-parameters, init)."""

from __future__ import annotations

from typing import Literal

import dagster as dg
from pydantic import Field

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.training import TrainParams
from selfimprove_dagster.training.params import RLParams


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
    learning_rate: float = Field(default=3e-4, gt=0, description="AdamW learning rate.")
    epochs: int = Field(default=2, ge=1, description="Epochs over the filtered set.")
    batch_size: int = Field(default=16, ge=1, description="Examples per optimizer step.")
    micro_batch_tokens: int = Field(
        default=2048,
        ge=64,
        description="Tokens per forward pass in SFT/DPO/GRPO/RLOO: a batch of long sequences "
        "is split into micro-batches accumulated into one optimizer step (bounds training "
        "memory).",
    )
    seed: int = Field(default=0, description="Training seed.")
    device: Literal["cpu", "cuda"] = Field(
        default="cpu", description="Where LoRA training runs (the gpu/cluster profiles: cuda)."
    )
    dpo_learning_rate: float = Field(
        default=5e-5, description="Learning rate of DPO rounds (self_judge)."
    )
    dpo_beta: float = Field(
        default=0.1, description="DPO beta: pull towards the reference (the round's policy)."
    )
    rl_steps: int = Field(
        default=8, description="grpo/rloo: optimizer steps of the round's online RL."
    )
    rl_prompts_per_step: int = Field(
        default=4, description="grpo/rloo: prompts per optimizer step (each sampled as a group)."
    )
    rl_num_generations: int = Field(
        default=4, description="grpo/rloo: rollouts per prompt (the group of the advantage)."
    )
    rl_max_completion_length: int = Field(
        default=16, description="grpo/rloo: new tokens per rollout."
    )
    rl_learning_rate: float = Field(
        default=1e-4, description="grpo/rloo: AdamW learning rate of the LoRA adapter."
    )
    rl_beta: float = Field(
        default=0.04,
        description="grpo/rloo: KL pull to the start policy (the adapter-free network); "
        "0 skips the reference forward pass and logs no KL.",
    )
    rl_temperature: float = Field(default=0.8, description="grpo/rloo: rollout temperature.")
    rl_loss_type: str = Field(
        default="dapo", description="grpo: TRL loss type (grpo, dapo, dr_grpo, bnpo)."
    )
    rl_format_reward_weight: float = Field(
        default=0.0,
        description="grpo/rloo: weight of a format reward (1 when the reply is just a "
        "number); 0 rewards the verifier only.",
    )
    rl_use_vllm: bool = Field(
        default=False,
        description="grpo/rloo: generate rollouts with TRL's vLLM integration in colocate "
        "mode (the gpu profile); otherwise transformers.",
    )

    def params(self, objective: str = "sft", answer_format: str = "short") -> TrainParams:
        """Hyper-parameters for `objective` (DPO takes its own learning rate and beta;
        grpo/rloo the round's `answer_format`, see `rl_params`)."""
        return TrainParams(
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            learning_rate=self._learning_rate(objective),
            epochs=self.epochs,
            batch_size=self.batch_size,
            micro_batch_tokens=self.micro_batch_tokens,
            seed=self.seed,
            beta=self.dpo_beta,
            device=self.device,
            rl=self.rl_params(answer_format) if objective in ("grpo", "rloo") else None,
        )

    def rl_params(self, answer_format: str = "short") -> RLParams:
        """Settings of an online RL round (grpo / rloo); `answer_format` is the round's
        prompt format (with `rationale` a rollout cut off at the limit earns nothing
        from the verifier's last-resort answer: `RLParams.reject_cut_off`)."""
        return RLParams(
            steps=self.rl_steps,
            prompts_per_step=self.rl_prompts_per_step,
            num_generations=self.rl_num_generations,
            max_completion_length=self.rl_max_completion_length,
            temperature=self.rl_temperature,
            beta=self.rl_beta,
            loss_type=self.rl_loss_type,
            format_reward_weight=self.rl_format_reward_weight,
            use_vllm=self.rl_use_vllm,
            reject_cut_off=answer_format == "rationale",
        )

    def _learning_rate(self, objective: str) -> float:
        if objective == "dpo":
            return self.dpo_learning_rate
        return self.rl_learning_rate if objective in ("grpo", "rloo") else self.learning_rate

    def trained_from(self, policy: str, base_model: str) -> str:
        """The model the round's adapter is trained on top of."""
        if self.init == "continue":
            return policy
        if self.init == "restart":
            return base_model
        raise SelfImproveError(f"Unknown trainer init `{self.init}`", "use `continue` or `restart`")
