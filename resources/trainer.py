"""How a round's checkpoint is trained (LoRA hyper-parameters, init)."""

from __future__ import annotations

from typing import Literal

import dagster as dg
from pydantic import Field

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.training import TrainParams


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
    device: Literal["cpu", "cuda"] = Field(
        default="cpu", description="Where LoRA training runs (the gpu/cluster profiles: cuda)."
    )
    dpo_learning_rate: float = Field(
        default=5e-5, description="Learning rate of DPO rounds (self_judge)."
    )
    dpo_beta: float = Field(
        default=0.1, description="DPO beta: pull towards the reference (the round's policy)."
    )

    def params(self, objective: str = "sft") -> TrainParams:
        """Hyper-parameters for `objective` (DPO takes its own learning rate and beta)."""
        return TrainParams(
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            learning_rate=self.dpo_learning_rate if objective == "dpo" else self.learning_rate,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.seed,
            beta=self.dpo_beta,
            device=self.device,
        )

    def trained_from(self, policy: str, base_model: str) -> str:
        """The model the round's adapter is trained on top of."""
        if self.init == "continue":
            return policy
        if self.init == "restart":
            return base_model
        raise SelfImproveError(f"Unknown trainer init `{self.init}`", "use `continue` or `restart`")
