"""Held-out evaluation: a round's scores and the policy scoring they rest on.

    scores = score_round(store, "round_001", recipe, plan, load_engine, log)
    scores.before, scores.after, scores.tables()   # eval_scores (one row), eval_details

Greedy accuracy runs on every held-out prompt; pass@k samples k completions on the
first `pass_at_k_prompts` held-out prompts (sampling is the expensive part on CPU).
A round's `eval_scores` row puts the checkpoint's accuracy next to the accuracy of the
policy that generated the round (before -> after), with the round's B-STaR monitors,
its method's figures, its RL health and, with auto_temperature, the next round's
temperature (`tune_next_temperature`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import polars as pl

from selfimprove_dagster.engines.base import GenerationEngine, Sampling
from selfimprove_dagster.evolution import choose_temperature_from_samples
from selfimprove_dagster.methods import recipe as methods
from selfimprove_dagster.methods import star
from selfimprove_dagster.progress import LogFn
from selfimprove_dagster.quality import monitors
from selfimprove_dagster.quality.metrics import mean, pass_at_k
from selfimprove_dagster.quality.rl_health import round_health
from selfimprove_dagster.sources.tasks import VERIFIER_COLUMNS
from selfimprove_dagster.store.storage import RoundStore
from selfimprove_dagster.verifiers.dispatch import verify_rows


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # greedy accuracy over all held-out prompts
    pass_at_k: float | None  # mean unbiased pass@k over the sampled prompts
    k: int
    details: pl.DataFrame  # one row per held-out prompt


def evaluate_policy(
    engine: GenerationEngine,
    eval_set: pl.DataFrame,
    max_new_tokens: int,
    k: int,
    sampling: Sampling,
    pass_at_k_prompts: int,
    log: LogFn | None = None,
    answer_format: str = "short",
) -> EvalResult:
    """Score `engine`'s policy on the held-out prompts (`prompt_id`, `prompt`, `answer`).

    With `answer_format` rationale a reply cut off at the token limit before a final
    answer is wrong (reason `cut_off`), as in the round's critiques.
    """
    prompts = eval_set["prompt"].to_list()
    rows = eval_set.select(
        "answer", *[c for c in VERIFIER_COLUMNS if c in eval_set.columns]
    ).to_dicts()
    greedy = Sampling(temperature=0.0, max_new_tokens=max_new_tokens, seed=sampling.seed)
    greedy_out = engine.generate(prompts, 1, greedy, log=log)
    greedy_verdicts = verify_rows(
        [c.text for c in greedy_out], _with_cut_off(rows, greedy_out, answer_format)
    )

    n_sampled = min(pass_at_k_prompts, len(prompts)) if k > 0 else 0
    correct_counts: list[int | None] = [None] * len(prompts)
    if n_sampled:
        sampled = engine.generate(prompts[:n_sampled], k, sampling, log=log)
        verdicts = verify_rows(
            [c.text for c in sampled],
            _with_cut_off([rows[c.prompt_index] for c in sampled], sampled, answer_format),
        )
        for c, verdict in zip(sampled, verdicts, strict=True):
            ok = verdict.correct
            correct_counts[c.prompt_index] = (correct_counts[c.prompt_index] or 0) + int(ok)

    details = pl.DataFrame(
        {
            "prompt_id": eval_set["prompt_id"],
            "greedy_completion": [c.text for c in greedy_out],
            "greedy_answer": [v.extracted for v in greedy_verdicts],
            "greedy_correct": [v.correct for v in greedy_verdicts],
            "samples": [k if n is not None else None for n in correct_counts],
            "samples_correct": correct_counts,
            "pass_at_k": [pass_at_k(k, n, k) if n is not None else None for n in correct_counts],
        },
        schema_overrides={
            "greedy_answer": pl.String,
            "samples": pl.Int64,
            "samples_correct": pl.Int64,
            "pass_at_k": pl.Float64,
        },
    )
    sampled_scores = [s for s in details["pass_at_k"].to_list() if s is not None]
    return EvalResult(
        accuracy=mean([float(v.correct) for v in greedy_verdicts]),
        pass_at_k=mean(sampled_scores) if sampled_scores else None,
        k=k,
        details=details,
    )


def _with_cut_off(rows: list[dict], completions: list, answer_format: str) -> list[dict]:
    # The verifiers' `cut_off` row field (verifiers.numeric.verify): rationale format only.
    if answer_format != "rationale":
        return rows
    return [
        {**row, "cut_off": c.finish_reason == "length"}
        for row, c in zip(rows, completions, strict=True)
    ]


def previous_accuracy(
    store: RoundStore, parent: str | None, eval_set: pl.DataFrame
) -> float | None:
    """Round N−1's checkpoint accuracy (the policy of round N), if it scored this eval set."""
    if parent is None or not store.has(parent, "eval_details"):
        return None
    previous = store.read(parent, "eval_details")
    if sorted(previous["prompt_id"]) != sorted(eval_set["prompt_id"]):
        return None
    return float(previous["greedy_correct"].mean())


def balance_by_temperature(
    engine: GenerationEngine,
    train_set: pl.DataFrame,
    round_: str,
    k: int,
    sampling: Sampling,
    grid: list[float],
    max_per_prompt: int,
    log: LogFn | None = None,
) -> dict[float, float]:
    """B-STaR's configuration search: the balance score of the round's filter at each
    temperature of `grid`, measured by sampling k answers per prompt of `train_set`
    with `engine` (the new checkpoint, i.e. the next round's policy)."""
    scores: dict[float, float] = {}
    for temperature in grid:
        at = replace(sampling, temperature=temperature)
        generated = star.sample_generations(engine, train_set, round_, k, at, log=log)
        critiques = star.critique_generations(generated, train_set)
        kept = star.filter_accepted(generated, critiques, max_per_prompt)
        scores[temperature] = monitors.balance_score(critiques, kept, target=max_per_prompt)
    return scores


def tune_next_temperature(
    engine: Any,
    store: RoundStore,
    round_: str,
    *,
    k: int,
    sampling: Any,
    grid: Sequence[float],
    max_per_prompt: int,
    tuning_prompts: int,
    log: Any = print,
) -> dict[str, Any]:
    """The next round's temperature, B-STaR style: the balance score of the new
    checkpoint (`engine`) at each grid temperature on `tuning_prompts` train prompts of
    `round_`; the argmax wins (ties keep the current temperature). Returns the
    `eval_scores` columns `next_temperature` and `next_temperature_reason`."""
    train_set = star.train_prompts(store.read(round_, "prompts")).head(tuning_prompts)
    balance = balance_by_temperature(
        engine, train_set, round_, k, sampling, list(grid), max_per_prompt, log=log
    )
    current = float(store.read(round_, "generations")["temperature"][0])
    temperature, reason = choose_temperature_from_samples(balance, current=current)
    log(f"{round_}: next round's temperature: {reason}")
    return {"next_temperature": temperature, "next_temperature_reason": reason}


# --- a round's scores ------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringPlan:
    """How a round is scored (the Dagster layer fills it from the loop's settings)."""

    sampling: Sampling  # the round's sampling settings (pass@k samples with them)
    max_new_tokens: int  # greedy completion budget
    eval_samples: int  # k of held-out pass@k (0: greedy only)
    pass_at_k_prompts: int  # held-out prompts pass@k samples on
    samples_per_prompt: int  # the round's k per train prompt (its monitors, tuning)
    max_per_prompt: int  # the filter's cap (the monitors' target)
    answer_format: str = "short"  # rationale: a reply cut off before its answer is wrong
    auto_temperature: bool = False  # measure the next round's temperature
    temperature_grid: tuple[float, ...] = ()
    tuning_prompts: int = 0


@dataclass(frozen=True)
class RoundScores:
    """A round's held-out scores: the `eval_scores` row and the per-prompt details."""

    row: dict[str, Any]
    details: pl.DataFrame

    @property
    def before(self) -> float:
        return self.row["accuracy_before"]

    @property
    def after(self) -> float:
        return self.row["accuracy_after"]

    def tables(self) -> dict[str, pl.DataFrame]:
        return {"eval_scores": pl.DataFrame([self.row]), "eval_details": self.details}


def score_round(
    store: RoundStore,
    round_: str,
    recipe: methods.Recipe,
    plan: ScoringPlan,
    load_engine: Callable[[str], GenerationEngine],
    log: LogFn = print,
) -> RoundScores:
    """Score `round_`'s checkpoint on the held-out prompts next to the policy that
    generated the round (`accuracy_before`: round N−1's own score when it scored this
    held-out set, else measured now), with the round's monitors and figures.

    `load_engine(model_ref)` lends an engine; the checkpoint is loaded last, so with a
    kept engine it stays loaded for the next round's policy."""
    policy, parent = store.generation_policy(round_)
    eval_set = star.eval_prompts(store.read(round_, "prompts"))
    started = time.monotonic()

    def score(engine: GenerationEngine, k: int) -> EvalResult:
        return evaluate_policy(
            engine, eval_set, plan.max_new_tokens, k, plan.sampling, plan.pass_at_k_prompts,
            log=log, answer_format=plan.answer_format,
        )  # fmt: skip

    before = previous_accuracy(store, parent, eval_set)
    if before is None:  # round 0, or the held-out set changed: measure the policy now
        log(f"{round_}: scoring the policy {policy} on the held-out set")
        policy_engine = load_engine(policy)
        try:
            before = score(policy_engine, 0).accuracy
        finally:
            policy_engine.close()
    engine = load_engine(str(store.checkpoint_dir(round_)))
    try:
        after = score(engine, plan.eval_samples)
        tuning = _tune(engine, store, round_, plan, log) if plan.auto_temperature else {}
    finally:
        engine.close()
    row = {
        "round": round_,
        "checkpoint": str(store.checkpoint_dir(round_)),
        "policy": policy,
        "accuracy_before": before,
        "accuracy_after": after.accuracy,
        "pass_at_k": after.pass_at_k,
        "k": after.k,
        "n_eval": eval_set.height,
        **round_figures(store, round_, recipe, plan),
        **tuning,
        "eval_seconds": round(time.monotonic() - started, 1),
    }
    return RoundScores(row, after.details.with_columns(round=pl.lit(round_)))


def round_figures(store: RoundStore, round_: str, recipe, plan: ScoringPlan) -> dict:
    """The round's B-STaR monitors, its method's figures and its RL health."""
    generations = store.read(round_, "generations")
    critiques = store.read(round_, "critiques")
    filtered = store.read(round_, "filtered")
    return {
        **monitors.round_health(
            generations, critiques, filtered, k=plan.samples_per_prompt, target=plan.max_per_prompt
        ),
        **methods.method_metrics(recipe, critiques, filtered),
        **round_health(store, round_, recipe.online),
    }


def _tune(engine, store: RoundStore, round_: str, plan: ScoringPlan, log) -> dict:
    return tune_next_temperature(
        engine,
        store,
        round_,
        k=plan.samples_per_prompt,
        sampling=plan.sampling,
        grid=plan.temperature_grid,
        max_per_prompt=plan.max_per_prompt,
        tuning_prompts=plan.tuning_prompts,
        log=log,
    )
