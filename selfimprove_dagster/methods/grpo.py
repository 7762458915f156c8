"""Online RL rounds: GRPO / RLOO (TRL) with the round's verifier as the reward, and
every rollout the trainer samples recorded as data.

The asset graph is the same as for STaR; what each step holds for an RL round:

    generations  k samples per train prompt from the round's *starting* policy: the
                 pre-training exploration measurement (exactly as in a STaR round)
    critiques    the verifier on those samples (its verdict is the reward, 0 or 1)
    filtered     the prompts the trainer trains on (one row each, source=rl_prompt),
                 with their reward statistics under the starting policy; the row's
                 completion is that prompt's best sample, kept for lineage, never an
                 SFT target              (`select_rl_prompts`)
    checkpoint   GRPOTrainer (or RLOOTrainer) + LoRA on those prompts, reward = the
                 verifier (+ an optional format reward)         (`build_rl_trainer`)
                 -> table `rollouts`: one row per rollout with the generations and
                    critiques columns plus step, policy_version, reward, advantage
                 -> table `rl_steps`: the trainer's health figures per optimizer step
    eval_scores  held-out accuracy as for every method, plus `rl_*` health columns

Why rollouts are a table of their own and not rows appended to `generations` /
`critiques`: those two assets are materialized (and gated) before `checkpoint` runs,
and a round's tables are one version written by the step that owns them. Rewriting
them from the training step would make "done" depend on which step wrote last. So
the checkpoint step writes its rollouts once, in the same column shape (plus
`phase='rollout'`, `step`, `policy_version`, `reward`, `advantage`), and the catalog
has a `rollouts` view beside `generations` / `critiques`; `SELECT * FROM generations
UNION ALL BY NAME SELECT * FROM rollouts` gives every sample of a round.

A rollout's `generation_id` hashes (round, optimizer step, prompt_id, index in its
group), so ids never collide with the exploration samples or across steps. Its
`policy_version` is the number of optimizer updates applied before it was sampled
(TRL samples a step's batch with the current weights; `num_iterations=1`, so the
version of step s's rollouts is s-1; version 0 is the starting policy).

Generation inside the trainer: transformers on CPU (the default); with `use_vllm`
(the gpu profile) TRL's vLLM integration in colocate mode. How the rollouts are
caught: both TRL trainers keep the last generation batch (prompt, completion, one
reward per reward function, advantage, and the extra columns our reward function
logs with `log_extra`) in a rolling log of one batch, which GRPO's `log_completions`
writes to `output_dir/completions/*.parquet` at each logging step. With
`logging_steps=1` and one generation batch per optimizer step that batch is exactly
the step's rollouts; a callback copies it at every log (`_RolloutLog`; RLOO has no
Parquet writer, so the callback serves both), and `RolloutRecorder` turns the copies
into rows after training.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import polars as pl

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.quality.rl_health import health_summary
from selfimprove_dagster.store.schemas import ROLLOUTS_TABLE, STEPS_TABLE, polars_schema
from selfimprove_dagster.text import last_message_text
from selfimprove_dagster.training.params import RL_ALGORITHMS, RLParams

ALGORITHMS = RL_ALGORITHMS
SOURCE = "rl_prompt"  # `filtered.source` of an RL round: a prompt to train on, not a target
PROMPT_FILTERS = ("signal_first", "all")


# --- filtered: the prompts to train on ----------------------------------------------


def select_rl_prompts(
    generations: pl.DataFrame,
    critiques: pl.DataFrame,
    n_prompts: int,
    prompt_filter: str,
    seed: int,
) -> pl.DataFrame:
    """The round's `filtered` table for an RL round: one row per prompt to train on.

    `signal_first` (default) takes first the prompts whose samples under the starting
    policy were sometimes right and sometimes wrong (their group has reward variance:
    GRPO learns only from those), then never-solved prompts, then always-solved ones,
    each shuffled with the seed; `all` shuffles all prompts. Why: a group whose rewards
    are all equal has zero advantage and gives no gradient (measured on the embedded
    model: from the base model 75-100% of groups had none), so spending steps on them
    buys nothing.

    Rows: round, generation_id (the prompt's best-rewarded sample, for lineage; never an
    SFT target), prompt_id, prompt, completion (that sample), source (rl_prompt),
    answer, samples, reward_mean, reward_std, has_signal, selected_reason.
    """
    if prompt_filter not in PROMPT_FILTERS:
        raise SelfImproveError(
            f"Unknown RL prompt filter `{prompt_filter}`",
            f"use one of: {', '.join(PROMPT_FILTERS)} (SELFIMPROVE_RL_PROMPT_FILTER)",
        )
    scored = generations.select(
        "round", "generation_id", "prompt_id", "sample_index", "prompt", "completion"
    ).join(
        critiques.select(
            "generation_id",
            "reference_answer",
            reward=pl.col("verdict").eq("accept").cast(pl.Float64),
        ),
        on="generation_id",
    )
    per_prompt = (
        scored.sort("prompt_id", pl.col("reward"), "sample_index", descending=[False, True, False])
        .group_by("prompt_id", maintain_order=True)
        .agg(
            pl.first("round", "generation_id", "prompt", "completion"),
            answer=pl.first("reference_answer"),
            samples=pl.len(),
            reward_mean=pl.col("reward").mean(),
            reward_std=pl.col("reward").std(ddof=0),
        )
        .with_columns(has_signal=pl.col("reward_std") > 0)
        .with_columns(
            selected_reason=pl.when(pl.lit(prompt_filter == "all"))
            .then(pl.lit("all"))
            .when("has_signal")
            .then(pl.lit("mixed_rewards"))
            .when(pl.col("reward_mean") == 0)
            .then(pl.lit("never_solved"))
            .otherwise(pl.lit("always_solved"))
        )
    )
    order = {"mixed_rewards": 0, "never_solved": 1, "always_solved": 2, "all": 0}
    ranked = (
        per_prompt.sample(fraction=1.0, shuffle=True, seed=seed)
        .with_columns(_rank=pl.col("selected_reason").replace_strict(order, return_dtype=pl.Int8))
        .sort("_rank", maintain_order=True)
        .head(n_prompts)
    )
    return ranked.select(
        "round",
        "generation_id",
        "prompt_id",
        "prompt",
        "completion",
        source=pl.lit(SOURCE),
        answer="answer",
        samples="samples",
        reward_mean="reward_mean",
        reward_std="reward_std",
        has_signal="has_signal",
        selected_reason="selected_reason",
    )


def training_examples(
    filtered: pl.DataFrame, prompts: pl.DataFrame | None = None
) -> list[dict[str, Any]]:
    """The trainer's dataset rows: the prompt, its reference answer and id, and what the
    prompt's verifier reads (`verifier`, `choices`, `tests`, ... from `prompts`): TRL
    passes every column to the reward function, which judges each rollout by its row."""
    rows = filtered.select("prompt", "answer", "prompt_id")
    if prompts is not None:
        from selfimprove_dagster.sources.tasks import VERIFIER_COLUMNS

        extra = [c for c in VERIFIER_COLUMNS if c in prompts.columns]
        if extra:
            by_id = prompts.select("prompt_id", *extra).unique("prompt_id", keep="first")
            rows = rows.join(by_id, on="prompt_id", how="left", maintain_order="left")
    return rows.to_dicts()


# --- rollouts and health as data ---------------------------------------------------


def rollout_generation_id(round_: str, step: int, prompt_id: str, index: int) -> str:
    """Id of one rollout: (round, optimizer step, prompt, index in its group) is unique."""
    text = f"rollout\x00{round_}\x00{step}\x00{prompt_id}\x00{index}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def rollout_rows(
    logged: pl.DataFrame, round_: str, policy: str, rl: RLParams, reward_columns: list[str]
) -> pl.DataFrame:
    """TRL's logged completions -> the round's `rollouts` table.

    Rows: the generations columns (round, generation_id, prompt_id, sample_index,
    prompt, completion, prompt_tokens, completion_tokens, finish_reason, policy,
    temperature, top_p, top_k, max_new_tokens, seed), the critiques columns (critic,
    verdict, correct, extracted_answer, reference_answer, reason, score, critique), and
    phase ("rollout"), step (the optimizer step it trained), policy_version (updates
    applied before it was sampled), reward (weighted sum), verifier_reward,
    format_reward (null without one), advantage.
    """
    if logged.height == 0:
        return pl.DataFrame(schema=polars_schema(ROLLOUTS_TABLE))
    weights = [1.0, rl.format_reward_weight][: len(reward_columns)]
    rows = []
    index_in_group: dict[tuple[int, str], int] = {}
    for r in logged.sort("step", maintain_order=True).iter_rows(named=True):
        step, prompt_id = int(r["step"]), r["prompt_id"]
        index = index_in_group.get((step, prompt_id), 0)
        index_in_group[(step, prompt_id)] = index + 1
        tokens = r.get("completion_tokens")
        correct = bool(r["correct"])
        verifier_score = float(r[reward_columns[0]])
        rows.append(
            {
                "round": round_,
                "generation_id": rollout_generation_id(round_, step, prompt_id, index),
                "prompt_id": prompt_id,
                "sample_index": index,
                "prompt": last_message_text(r["prompt"]),
                "completion": last_message_text(r["completion"]),
                "prompt_tokens": None,
                "completion_tokens": tokens,
                "finish_reason": "length"
                if tokens is not None and tokens >= rl.max_completion_length
                else "stop",
                "policy": policy,
                "temperature": rl.temperature,
                "top_p": 1.0,
                "top_k": rl.top_k,
                "max_new_tokens": rl.max_completion_length,
                "seed": None,
                "critic": "verifier",
                "verdict": "accept" if correct else "reject",
                "correct": correct,
                "extracted_answer": r["extracted_answer"],
                "reference_answer": r["reference_answer"],
                "reason": r["reason"],
                "score": verifier_score,
                "critique": _critique_text(r["extracted_answer"], correct, r["reference_answer"]),
                "phase": "rollout",
                "step": step,
                "policy_version": step - 1,
                "reward": sum(
                    w * float(r[c]) for w, c in zip(weights, reward_columns, strict=False)
                ),
                "verifier_reward": verifier_score,
                "format_reward": float(r[reward_columns[1]]) if len(reward_columns) > 1 else None,
                "advantage": float(r["advantage"]),
            }
        )
    return pl.DataFrame(rows, schema=polars_schema(ROLLOUTS_TABLE))


def _critique_text(extracted: str | None, correct: bool, reference: str) -> str:
    if extracted is None:
        return f"no final answer found; reference {reference}"
    return (
        f"answer {extracted} {'matches' if correct else 'does not match'} the reference {reference}"
    )


# TRL log key -> `rl_steps` column (a key TRL did not log leaves the column null: `kl`
# needs beta > 0, clip ratios need more than one iteration per batch to be non-zero).
STEP_FIGURES = {
    "reward": "reward_mean",
    "reward_std": "reward_std",
    "frac_reward_zero_std": "zero_std_fraction",
    "kl": "kl",
    "entropy": "entropy",
    "completions/mean_length": "mean_completion_tokens",
    "completions/clipped_ratio": "truncated_fraction",
    "clip_ratio/region_mean": "clip_ratio",
    "loss": "loss",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
}


def step_rows(log_history: list[dict[str, Any]], round_: str) -> pl.DataFrame:
    """The trainer's per-step figures -> table `rl_steps` (one row per optimizer step).

    Columns: round, step, reward_mean, reward_std (spread of the step's rewards),
    zero_std_fraction (prompts whose group had no reward variance: no learning signal),
    kl (to the start policy), entropy (mean token entropy of the rollouts),
    mean_completion_tokens, truncated_fraction (rollouts that hit the length limit),
    clip_ratio (PPO-clipped token share), loss, grad_norm, learning_rate.
    """
    rows = []
    for entry in log_history:
        if "step" not in entry or "reward" not in entry:
            continue  # the end-of-training summary has no per-step figures
        row = {"round": round_, "step": int(entry["step"])}
        row |= {column: _finite(entry.get(key)) for key, column in STEP_FIGURES.items()}
        rows.append(row)
    return pl.DataFrame(rows, schema=polars_schema(STEPS_TABLE))


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class RolloutRecorder:
    """Collects a finished RL trainer's rollouts and per-step figures (pass
    `recorder.collect` as `train_lora(after_train=...)`), then hands them to the asset."""

    round_: str
    policy: str  # the model the rollouts' policy_version 0 is (the round's start policy)
    rl: RLParams
    rollouts: pl.DataFrame | None = None
    steps: pl.DataFrame | None = None

    def collect(self, trainer) -> dict[str, Any]:
        """Turn the trainer's rollout log and log history into rows; returns the
        manifest's RL summary (the `HEALTH_COLUMNS` figures)."""
        batches = [pl.DataFrame(b, strict=False) for b in getattr(trainer, "rollout_log", [])]
        logged = pl.concat(batches, how="diagonal_relaxed") if batches else pl.DataFrame()
        names = [getattr(f, "__name__", str(f)) for f in trainer.reward_funcs]
        self.rollouts = rollout_rows(logged, self.round_, self.policy, self.rl, names)
        self.steps = step_rows(trainer.state.log_history, self.round_)
        return {"rl": health_summary(self.steps, self.rollouts)}
