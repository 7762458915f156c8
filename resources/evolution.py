"""How rounds follow each other: policy choice, temperature choice, stop rules."""

from __future__ import annotations

from typing import Literal

import dagster as dg
from pydantic import Field

from selfimprove_dagster.evolution import StopRules


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
