"""The self-improvement recipe: who critiques and what the round trains on."""

from __future__ import annotations

from typing import Literal

import dagster as dg
from pydantic import Field

from selfimprove_dagster.methods.recipe import MethodSettings, Recipe, parse_method


class MethodResource(dg.ConfigurableResource):
    """Which self-improvement recipe the round runs (see `selfimprove_dagster.methods.recipe`)."""

    method: str = Field(
        default="star",
        description="star (verifier), self_consistency (majority-vote pseudo-labels), "
        "self_judge (the policy judges itself; DPO pairs), self_refine (= star+self_refine), "
        "or <star|self_consistency>+self_refine; self_verify (the policy's own likelihood "
        "picks a sample; SFT-sharpening); grpo / rloo (online RL in `checkpoint`, TRL).",
    )
    vote_threshold: float = Field(
        default=0.5,
        description="self_consistency: least share of a prompt's samples on the majority "
        "answer for it to become the pseudo-label.",
    )
    judge_accept_points: float = Field(
        default=4.0, description="self_judge: rubric points (0-5) at which the judge accepts."
    )
    judge_margin: float = Field(
        default=0.2,
        description="self_judge: least score gap (0-1, i.e. points/5) between the chosen "
        "and the rejected answer of a preference pair.",
    )
    judge_samples: int = Field(
        default=3, description="self_judge: sampled judgements averaged per answer."
    )
    judge_temperature: float = Field(
        default=0.7, description="self_judge: sampling temperature of the judge."
    )
    judge_max_new_tokens: int = Field(
        default=8, description="self_judge: token budget of the judge's reply (a score)."
    )
    refine_feedback: Literal["critic", "self"] = Field(
        default="critic",
        description="self_refine: feedback for a rejected answer: the critic's message "
        "(Re-ReST) or the policy's own critique (SELF).",
    )
    refine_max: int = Field(
        default=200, description="self_refine: rejected answers refined per round."
    )
    refine_probe: int = Field(
        default=50,
        description="self_refine: accepted answers also refined (never trained on) to "
        "count how many the refinement breaks.",
    )
    critique_max_new_tokens: int = Field(
        default=48, description="self_refine with self feedback: token budget of a critique."
    )
    rl_prompt_filter: Literal["signal_first", "all"] = Field(
        default="signal_first",
        description="grpo/rloo: which train prompts `filtered` keeps for RL: signal_first "
        "(prompts whose starting-policy samples were sometimes right first) or all.",
    )

    rationalize: bool = Field(
        default=False,
        description="star: STaR rationalization: for train prompts with no accepted sample, "
        "sample again with the reference answer as a hint; accepted rationales train on the "
        "prompt without the hint (filtered rows source=rationalized, hint_used).",
    )
    rationalize_samples: int = Field(
        default=2, ge=1, description="star with rationalize: hinted samples per unsolved prompt."
    )
    rationalize_max: int = Field(
        default=200, ge=0, description="star with rationalize: unsolved prompts per round."
    )

    def recipe(self) -> Recipe:
        return parse_method(self.method)

    def settings(self, rl_prompts: int = 32, seed: int = 0) -> MethodSettings:
        """The critics' knobs; grpo/rloo also need how many prompts the trainer takes
        (`TrainerResource.rl_steps` x `rl_prompts_per_step`) and the seed."""
        return MethodSettings(
            vote_threshold=self.vote_threshold,
            judge_accept_points=self.judge_accept_points,
            judge_margin=self.judge_margin,
            judge_samples=self.judge_samples,
            judge_temperature=self.judge_temperature,
            judge_max_new_tokens=self.judge_max_new_tokens,
            refine_feedback=self.refine_feedback,
            refine_max=self.refine_max,
            refine_probe=self.refine_probe,
            critique_max_new_tokens=self.critique_max_new_tokens,
            rl_prompt_filter=self.rl_prompt_filter,
            rl_prompts=rl_prompts,
            seed=seed,
            rationalize=self.rationalize,
            rationalize_samples=self.rationalize_samples,
            rationalize_max=self.rationalize_max,
        )
