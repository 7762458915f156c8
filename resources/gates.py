"""Thresholds of the quality gates."""

from __future__ import annotations

import dagster as dg
from pydantic import Field


class GatesResource(dg.ConfigurableResource):
    """Thresholds of the round's quality gates (blocking) and health monitors (WARN)."""

    min_filtered: int = Field(
        default=1, description="Fewest filtered rows a round may train on (blocking)."
    )
    regression_tolerance: float = Field(
        default=0.05,
        description="Largest held-out accuracy drop vs the round's policy allowed (blocking).",
    )
    near_duplicate_threshold: float = Field(
        default=0.9,
        description="Similarity at which a train prompt counts as a copy of an eval prompt.",
    )
    max_exploration_drop: float = Field(
        default=0.5, description="WARN when pass@k or distinct correct answers fall this much."
    )
    max_unscored: float = Field(
        default=0.5, description="WARN when the critic (a judge) scores fewer generations."
    )
    max_truncated: float = Field(
        default=0.5,
        description="WARN when more than this share of samples stopped at the token limit "
        "(raise SELFIMPROVE_MAX_NEW_TOKENS, or use answer_format=rationale's budget).",
    )
