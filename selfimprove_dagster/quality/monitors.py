"""B-STaR monitors of a round: is the policy still exploring, is the filter exploiting well?

Zeng et al. (2024), "B-STaR: Monitoring and Balancing Exploration and Exploitation in
Self-Taught Reasoners", track two things across self-improvement rounds:

- exploration: can the policy still find correct answers, and several different ones?
  (pass@k, distinct correct answers per prompt, answer diversity, solved fraction)
- exploitation: does the selection keep the right samples? (precision / recall of the
  filtered set, and of the critic's own verdicts, against ground truth)

and combine them in a *balance score* used to pick the next round's temperature and
threshold. All functions take a round's frames (`generations`, `critiques`,
`filtered`) and return plain floats, so an asset can store them and a check can WARN
when exploration collapses (`exploration_dropped`).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from selfimprove_dagster.quality.gates import GateResult
from selfimprove_dagster.quality.metrics import pass_at_k
from selfimprove_dagster.quality.rl_health import health_summary

# The monitors `exploration_dropped` compares between rounds.
EXPLORATION_KEYS = ("pass_at_k", "distinct_correct_per_prompt")
# Everything `exploration()` returns (stored as `train_<name>` next to held-out scores).
EXPLORATION_COLUMNS = (
    "pass_at_k",
    "distinct_correct_per_prompt",
    "answer_diversity",
    "solved_fraction",
)


def exploration(
    generations: pl.DataFrame, critiques: pl.DataFrame, k: int
) -> dict[str, float | None]:
    """Exploration of the round's policy over its train prompts (one group per prompt).

    - pass_at_k: mean unbiased pass@k, n = the prompt's samples (k is capped at n, so a
      prompt with fewer samples reports pass@n).
    - distinct_correct_per_prompt: mean number of different correct completions
      (normalized text), i.e. different correct reasoning paths, not just answers.
    - answer_diversity: mean of distinct extracted answers / samples.
    - solved_fraction: prompts with at least one correct sample.

    Values are None when the round has no generations.
    """
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got {k}")
    per_prompt = (
        _judged(generations, critiques)
        .group_by("prompt_id")
        .agg(
            n=pl.len(),
            c=pl.col("correct").sum(),
            distinct_correct=pl.col("normalized").filter(pl.col("correct")).n_unique(),
            distinct_answers=pl.col("extracted_answer").drop_nulls().n_unique(),
        )
    )
    if per_prompt.height == 0:
        return dict.fromkeys(
            ("pass_at_k", "distinct_correct_per_prompt", "answer_diversity", "solved_fraction")
        )
    scores = [pass_at_k(n, c, min(k, n)) for n, c in per_prompt.select("n", "c").iter_rows()]
    return {
        "pass_at_k": sum(scores) / len(scores),
        "distinct_correct_per_prompt": float(per_prompt["distinct_correct"].mean()),
        "answer_diversity": float((per_prompt["distinct_answers"] / per_prompt["n"]).mean()),
        "solved_fraction": float((per_prompt["c"] > 0).mean()),
    }


def exploitation(critiques: pl.DataFrame, filtered: pl.DataFrame) -> dict[str, float | None]:
    """Precision and recall against ground truth (`critiques.correct`) of the selection
    (a generation is selected when it is in `filtered`) and of the critic's own verdict
    (`accept`). Rows without ground truth are left out; None where a ratio is undefined
    (nothing selected, or nothing correct)."""
    truth = critiques.filter(pl.col("correct").is_not_null()).select(
        "correct",
        selected=pl.col("generation_id").is_in(filtered["generation_id"]),
        accepted=pl.col("verdict") == "accept",
    )
    selection = _precision_recall(truth, "selected")
    critic = _precision_recall(truth, "accepted")
    return {
        "selection_precision": selection[0],
        "selection_recall": selection[1],
        "critic_precision": critic[0],
        "critic_recall": critic[1],
    }


def balance_score(critiques: pl.DataFrame, filtered: pl.DataFrame, target: int) -> float:
    """B-STaR balance score: mean over prompts of

        (correct / selected) × min(1, correct selected / target)

    over the prompts that have samples; a prompt with nothing selected scores 0. The
    first factor rewards exploitation (the selection is right), the second exploration
    (enough different correct samples to learn from; `filtered` is already deduplicated,
    so its correct rows are distinct). 0.0 when the round has no samples.
    """
    if target < 1:
        raise ValueError(f"the balance score needs a target >= 1, got {target}")
    prompts = critiques.select("prompt_id").unique()
    if prompts.height == 0:
        return 0.0
    correct = critiques.select("generation_id", correct=pl.col("correct").fill_null(False))
    selected = (
        filtered.select("prompt_id", "generation_id")
        .join(correct, on="generation_id", how="left")
        .group_by("prompt_id")
        .agg(n_selected=pl.len(), n_correct=pl.col("correct").fill_null(False).sum())
    )
    per_prompt = prompts.join(selected, on="prompt_id", how="left").select(
        score=(
            pl.col("n_correct")
            / pl.col("n_selected")
            * pl.min_horizontal(pl.lit(1.0), pl.col("n_correct") / target)
        ).fill_null(0.0)
    )
    return float(per_prompt["score"].mean())


def round_monitors(
    generations: pl.DataFrame,
    critiques: pl.DataFrame,
    filtered: pl.DataFrame,
    k: int,
    target: int,
) -> dict[str, float | None]:
    """All monitors of a round in one flat dict (metadata- and Parquet-friendly)."""
    return {
        **exploration(generations, critiques, k),
        **exploitation(critiques, filtered),
        "balance_score": balance_score(critiques, filtered, target),
        **data_sources(generations, filtered),
    }


def data_sources(generations: pl.DataFrame, filtered: pl.DataFrame) -> dict[str, float | None]:
    """Where the training rows came from and how many samples ran out of tokens:

    - rationalized_share: filtered rows written with the answer as a hint (STaR
      rationalization); None when the set is empty or has no `source`.
    - truncated_share: samples that stopped at the token limit (finish_reason length).
    """
    rationalized = None
    if filtered.height and "source" in filtered.columns:
        rationalized = float((filtered["source"] == "rationalized").mean())
    truncated = None
    if generations.height and "finish_reason" in generations.columns:
        truncated = float((generations["finish_reason"] == "length").mean())
    return {"rationalized_share": rationalized, "truncated_share": truncated}


def exploration_dropped(
    current: dict[str, Any], previous: dict[str, Any] | None, max_drop_fraction: float
) -> GateResult:
    """WARN signal: pass@k or distinct correct answers fell by more than
    `max_drop_fraction` of the previous round's value (exploration is collapsing, so
    later rounds will have fewer new correct samples to learn from).

    Passes on the first round, and for a figure that is missing or was 0 before.
    """
    floors, dropped = {}, []
    for key in EXPLORATION_KEYS:
        now, before = current.get(key), (previous or {}).get(key)
        if now is None or not before:
            continue
        floors[key] = before * (1.0 - max_drop_fraction)
        if now < floors[key]:
            dropped.append(f"{key} {before:.3f} -> {now:.3f} ({now / before - 1:+.0%})")
    observed = {key: current.get(key) for key in EXPLORATION_KEYS}
    if previous is None:
        message = "first round: no previous exploration figures to compare with"
    elif not dropped:
        figures = ", ".join(f"{k} {previous[k]:.3f} -> {current[k]:.3f}" for k in floors)
        message = f"exploration held within {max_drop_fraction:.0%}: {figures or 'no figures'}"
    else:
        message = (
            f"Exploration dropped by more than {max_drop_fraction:.0%}: {'; '.join(dropped)}. "
            "Fix: raise the sampling temperature or samples per prompt for the next round, "
            "or train less aggressively (fewer epochs, lower learning rate)"
        )
    return GateResult(not dropped, observed, floors, message, {"previous": previous or {}})


# --- helpers ---------------------------------------------------------------------


def _judged(generations: pl.DataFrame, critiques: pl.DataFrame) -> pl.DataFrame:
    """Generations with the ground truth and the extracted answer of their critique."""
    verdicts = critiques.select(
        "generation_id", "extracted_answer", correct=pl.col("correct").fill_null(False)
    )
    return generations.select(
        "generation_id",
        "prompt_id",
        # The same normalization as `star.filter_accepted`'s deduplication.
        normalized=pl.col("completion").str.strip_chars().str.to_lowercase(),
    ).join(verdicts, on="generation_id", how="inner")


def _precision_recall(truth: pl.DataFrame, chosen: str) -> tuple[float | None, float | None]:
    hits = truth.filter(pl.col(chosen) & pl.col("correct")).height
    n_chosen, n_correct = truth[chosen].sum(), truth["correct"].sum()
    precision = hits / n_chosen if n_chosen else None
    recall = hits / n_correct if n_correct else None
    return precision, recall


# --- online RL health (grpo / rloo rounds; figures from table `rl_steps`) -----------

RL_MAX_REWARD_DROP = 0.5  # WARN when the reward's last quarter is < half its first quarter
RL_MIN_ENTROPY_RATIO = 0.5  # WARN when token entropy fell below half its first quarter
RL_MAX_LENGTH_GROWTH = 2.0  # WARN when rollouts grew past twice their first-quarter length
RL_MAX_TRUNCATED = 0.5  # ... or more than half the rollouts hit the length limit


def _rl_health(steps: pl.DataFrame | None) -> dict[str, Any]:
    return health_summary(steps, None)


def _not_rl(name: str) -> GateResult:
    return GateResult(True, None, None, f"not an online RL round: no {name} to watch")


def rl_reward_collapsed(
    steps: pl.DataFrame | None, max_drop: float = RL_MAX_REWARD_DROP
) -> GateResult:
    """WARN signal: the mean reward of the last quarter of the RL steps fell by more
    than `max_drop` (a fraction) of the first quarter's (the policy is unlearning, or
    the reward is being gamed into failure)."""
    health = _rl_health(steps)
    first, last = health["rl_reward_first"], health["rl_reward_last"]
    if first is None or last is None:
        return _not_rl("reward")
    floor = first * (1.0 - max_drop)
    passed = not first or last >= floor
    message = (
        f"reward held: {first:.3f} -> {last:.3f} (floor {floor:.3f})"
        if passed
        else f"Reward collapsed: {first:.3f} -> {last:.3f} over the round's RL steps. Fix: "
        "lower rl_learning_rate, raise rl_beta (KL to the start policy), or start from the "
        "promoted policy"
    )
    return GateResult(passed, last, floor, message, {"first": first})


def rl_entropy_collapsed(
    steps: pl.DataFrame | None, min_ratio: float = RL_MIN_ENTROPY_RATIO
) -> GateResult:
    """WARN signal: the rollouts' token entropy fell below `min_ratio` of its first
    quarter (the policy stops exploring: later groups will have no reward variance)."""
    health = _rl_health(steps)
    first, last = health["rl_entropy_first"], health["rl_entropy_last"]
    if first is None or last is None:
        return _not_rl("entropy")
    floor = first * min_ratio
    passed = last >= floor
    message = (
        f"entropy held: {first:.3f} -> {last:.3f} (floor {floor:.3f})"
        if passed
        else f"Entropy collapsed: {first:.3f} -> {last:.3f}. Fix: raise rl_temperature, "
        "lower rl_learning_rate, or raise rl_beta"
    )
    return GateResult(passed, last, floor, message, {"first": first})


def rl_length_blew_up(
    steps: pl.DataFrame | None,
    max_growth: float = RL_MAX_LENGTH_GROWTH,
    max_truncated: float = RL_MAX_TRUNCATED,
) -> GateResult:
    """WARN signal: rollouts grew past `max_growth` times their first-quarter length,
    or more than `max_truncated` of them hit the length limit."""
    health = _rl_health(steps)
    first, last = health["rl_length_first"], health["rl_length_last"]
    truncated = health["rl_truncated_fraction"]
    if first is None or last is None:
        return _not_rl("completion length")
    ceiling = first * max_growth
    problems = []
    if last > ceiling:
        problems.append(f"mean length {first:.1f} -> {last:.1f} tokens (> {max_growth:g}x)")
    if truncated is not None and truncated > max_truncated:
        problems.append(f"{truncated:.0%} of rollouts hit the length limit")
    message = (
        f"length held: {first:.1f} -> {last:.1f} tokens, truncated {truncated or 0:.0%}"
        if not problems
        else f"Length blow-up: {'; '.join(problems)}. Fix: add a format reward "
        "(rl_format_reward_weight), lower rl_learning_rate, or raise rl_max_completion_length "
        "if answers need the room"
    )
    return GateResult(
        not problems,
        {"length": last, "truncated": truncated},
        {"length": ceiling, "truncated": max_truncated},
        message,
        {"first_length": first},
    )


def critique_rates(frame: pl.DataFrame) -> dict[str, float]:
    """Accept rate of the first critic, and ground-truth error rates where known."""
    first = frame.filter(pl.col("critic") == frame["critic"][0]) if frame.height else frame
    rates = {"accept_rate": float((first["verdict"] == "accept").mean() or 0.0)}
    if first["correct"].null_count() < first.height:
        rates["correct_rate"] = float(first["correct"].mean() or 0.0)
    rates["no_answer_rate"] = float(first["extracted_answer"].is_null().mean() or 0.0)
    return rates


def round_health(
    generated: pl.DataFrame, critiques: pl.DataFrame, kept: pl.DataFrame, k: int, target: int
) -> dict[str, Any]:
    """Kept fraction and the B-STaR monitors of a round's train-prompt sampling, named
    as `eval_scores` stores them (exploration figures prefixed `train_`)."""
    health = round_monitors(generated, critiques, kept, k=k, target=target)
    exploration = {f"train_{name}": health.pop(name) for name in EXPLORATION_COLUMNS}
    return {
        "kept": kept.height,
        "kept_fraction": kept.height / max(generated.height, 1),
        **exploration,
        **health,
    }
