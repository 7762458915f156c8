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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.verifiers.numeric import normalize_number

ALGORITHMS = ("grpo", "rloo")
ROLLOUTS_TABLE = "rollouts"  # one row per rollout (generations + critiques columns)
STEPS_TABLE = "rl_steps"  # one row per optimizer step (RL health figures)
SOURCE = "rl_prompt"  # `filtered.source` of an RL round: a prompt to train on, not a target
PROMPT_FILTERS = ("signal_first", "all")


@dataclass(frozen=True)
class RLParams:
    """Knobs of an online RL round (defaults: resources.TrainerResource `rl_*`)."""

    steps: int = 8  # optimizer steps (each: prompts_per_step prompts x num_generations)
    prompts_per_step: int = 4  # prompts per optimizer step
    num_generations: int = 4  # rollouts per prompt (the group advantages are computed in)
    max_completion_length: int = 16  # new tokens per rollout
    temperature: float = 0.8  # rollout sampling temperature
    top_k: int = 50  # rollout top-k
    beta: float = 0.04  # KL pull to the start policy (adapter off); 0 skips the ref forward
    loss_type: str = "dapo"  # TRL GRPO loss (grpo, dapo, dr_grpo, bnpo); RLOO ignores it
    format_reward_weight: float = 0.0  # weight of `format_reward` (0: verifier only)
    prompt_filter: str = "signal_first"  # which train prompts (see `select_rl_prompts`)
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
    are all equal has zero advantage and gives no gradient (DESIGN.md: from the base
    model 75-100% of groups had none), so spending steps on them buys nothing.

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


# --- rewards ---------------------------------------------------------------------


def _verify(completions: Sequence[str], rows: Sequence[dict], verifier: str | None) -> list:
    """The round's verifier over a batch: the one place the reward calls a verifier."""
    from selfimprove_dagster.verifiers.dispatch import verify_rows

    return verify_rows(completions, rows, verifier)


def _text(completion: Any) -> str:
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


# Keyword arguments TRL adds to a reward call that are not dataset columns.
_TRL_KWARGS = {"trainer_state", "log_extra", "log_metric", "environments", "completion_ids"}


def make_verifier_reward(
    verifier: str | None = None, cut_off_at: int | None = None
) -> Callable[..., list[float]]:
    """A TRL reward function: 1.0 when the round's verifier accepts the completion.

    `cut_off_at` (rationale rounds: `max_completion_length`): a completion of that many
    tokens stopped at the limit, and the verifier judges it with `cut_off` set (no
    last-resort answer, `star.critique_generations`' rule).

    It also logs, per rollout, the verdict's extracted answer and reason, the reference
    answer, the prompt id and the completion's token count as extra columns of TRL's
    completions table, so each rollout row can be written like a critique row.
    """

    def verifier_reward(prompts, completions, **kwargs) -> list[float]:
        n = len(completions)
        columns = {
            k: v
            for k, v in kwargs.items()
            if k not in _TRL_KWARGS and isinstance(v, list | tuple) and len(v) == n
        }
        rows = [{k: v[i] for k, v in columns.items()} for i in range(n)]
        ids = kwargs.get("completion_ids")
        if cut_off_at is not None and ids:
            rows = [r | {"cut_off": len(t) >= cut_off_at} for r, t in zip(rows, ids, strict=True)]
        texts = [_text(c) for c in completions]
        verdicts = _verify(texts, rows, verifier)
        log_extra = kwargs.get("log_extra")
        if log_extra is not None:
            log_extra("prompt_id", [r.get("prompt_id") for r in rows])
            log_extra("reference_answer", [str(r.get("answer")) for r in rows])
            log_extra("correct", [v.correct for v in verdicts])
            log_extra("extracted_answer", [v.extracted for v in verdicts])
            log_extra("reason", [v.reason for v in verdicts])
            log_extra("completion_tokens", [len(t) for t in ids] if ids else [None] * n)
        return [1.0 if v.correct else 0.0 for v in verdicts]

    return verifier_reward


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the reply is just a number (what the default task's prompt asks for)."""
    return [1.0 if normalize_number(_text(c).strip()) is not None else 0.0 for c in completions]


# --- the trainer -----------------------------------------------------------------


def rl_config_args(
    algorithm: str, rl: RLParams, common: dict[str, Any], micro_batch: int | None = None
) -> dict[str, Any]:
    """GRPOConfig / RLOOConfig arguments: `common` (the shared TrainingArguments of
    `training._trainer_args`) with the RL settings. Checked on CPU (DESIGN.md): bf16 and
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
    from selfimprove_dagster.training import TEMPLATE_OVERHEAD_TOKENS, micro_batch_size

    longest_prompt = max(
        (len(tokenizer(e["prompt"], add_special_tokens=False).input_ids) for e in examples),
        default=0,
    )
    longest = longest_prompt + rl.max_completion_length + TEMPLATE_OVERHEAD_TOKENS
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
    if algorithm not in ALGORITHMS:
        raise SelfImproveError(
            f"Unknown RL algorithm `{algorithm}`", f"use one of: {', '.join(ALGORITHMS)}"
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
                    "prompt": [_message_text(p) for p in batch["prompt"]],
                    "completion": [_message_text(c) for c in batch["completion"]],
                    **{name: list(v) for name, v in batch["rewards"].items()},
                    **{name: list(v) for name, v in batch["extra"].items()},
                    "advantage": list(batch["advantages"]),
                }
            )

    return _RolloutLog()


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
        return pl.DataFrame(schema=ROLLOUT_SCHEMA)
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
                "prompt": _text(r["prompt"]),
                "completion": _text(r["completion"]),
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
    return pl.DataFrame(rows, schema=ROLLOUT_SCHEMA)


def _critique_text(extracted: str | None, correct: bool, reference: str) -> str:
    if extracted is None:
        return f"no final answer found; reference {reference}"
    return (
        f"answer {extracted} {'matches' if correct else 'does not match'} the reference {reference}"
    )


ROLLOUT_SCHEMA = {
    "round": pl.String,
    "generation_id": pl.String,
    "prompt_id": pl.String,
    "sample_index": pl.Int64,
    "prompt": pl.String,
    "completion": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "finish_reason": pl.String,
    "policy": pl.String,
    "temperature": pl.Float64,
    "top_p": pl.Float64,
    "top_k": pl.Int64,
    "max_new_tokens": pl.Int64,
    "seed": pl.Int64,
    "critic": pl.String,
    "verdict": pl.String,
    "correct": pl.Boolean,
    "extracted_answer": pl.String,
    "reference_answer": pl.String,
    "reason": pl.String,
    "score": pl.Float64,
    "critique": pl.String,
    "phase": pl.String,
    "step": pl.Int64,
    "policy_version": pl.Int64,
    "reward": pl.Float64,
    "verifier_reward": pl.Float64,
    "format_reward": pl.Float64,
    "advantage": pl.Float64,
}

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
    schema = {"round": pl.String, "step": pl.Int64} | dict.fromkeys(
        STEP_FIGURES.values(), pl.Float64
    )
    return pl.DataFrame(rows, schema=schema)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# Columns an RL round adds to `eval_scores` (null for other methods).
HEALTH_COLUMNS = (
    "rl_steps",
    "rl_rollouts",
    "rl_reward_first",
    "rl_reward_last",
    "rl_reward_mean",
    "rl_reward_std_mean",
    "rl_zero_std_fraction",
    "rl_kl_last",
    "rl_entropy_first",
    "rl_entropy_last",
    "rl_length_first",
    "rl_length_last",
    "rl_truncated_fraction",
    "rl_clip_ratio",
)


def health_summary(steps: pl.DataFrame | None, rollouts: pl.DataFrame | None) -> dict:
    """One round's RL health in flat columns (`HEALTH_COLUMNS`, None when not RL).

    "first"/"last" are the mean of the first and last quarter of the steps (at least
    one step each), so one noisy step does not decide a trend.
    """
    out: dict[str, Any] = dict.fromkeys(HEALTH_COLUMNS)
    if steps is None or steps.height == 0:
        return out
    steps = steps.sort("step")
    q = max(1, steps.height // 4)

    def mean(column: str, frame: pl.DataFrame = steps) -> float | None:
        values = frame[column].drop_nulls()
        return float(values.mean()) if values.len() else None

    head, tail = steps.head(q), steps.tail(q)
    out |= {
        "rl_steps": steps.height,
        "rl_rollouts": rollouts.height if rollouts is not None else None,
        "rl_reward_first": mean("reward_mean", head),
        "rl_reward_last": mean("reward_mean", tail),
        "rl_reward_mean": mean("reward_mean"),
        "rl_reward_std_mean": mean("reward_std"),
        "rl_zero_std_fraction": mean("zero_std_fraction"),
        "rl_kl_last": mean("kl", tail),
        "rl_entropy_first": mean("entropy", head),
        "rl_entropy_last": mean("entropy", tail),
        "rl_length_first": mean("mean_completion_tokens", head),
        "rl_length_last": mean("mean_completion_tokens", tail),
        "rl_truncated_fraction": mean("truncated_fraction"),
        "rl_clip_ratio": mean("clip_ratio"),
    }
    return out


def round_health(store, round_: str, online: bool) -> dict:
    """The `rl_*` columns of a round's `eval_scores` (all None for a non-RL round)."""
    if not online or not store.has(round_, STEPS_TABLE):
        return health_summary(None, None)
    rollouts = store.read(round_, ROLLOUTS_TABLE) if store.has(round_, ROLLOUTS_TABLE) else None
    return health_summary(store.read(round_, STEPS_TABLE), rollouts)


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


def _message_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    messages = list(value) if value is not None else []
    if messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content", ""))
    return str(value)
