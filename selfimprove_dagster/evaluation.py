"""Held-out evaluation of a policy: greedy accuracy and pass@k.

Greedy accuracy runs on every held-out prompt; pass@k samples k completions on the
first `pass_at_k_prompts` held-out prompts (sampling is the expensive part on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from selfimprove_dagster.engines.base import GenerationEngine, Sampling
from selfimprove_dagster.progress import LogFn
from selfimprove_dagster.quality.metrics import mean, pass_at_k
from selfimprove_dagster.store.storage import RoundStore
from selfimprove_dagster.verifiers.dispatch import verify_rows

# Prompt columns a verifier may read besides `answer` (sources.tasks.VERIFIER_COLUMNS).
_VERIFIER_COLUMNS = ("verifier", "choices", "tests", "test_setup", "entry_point")


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
        "answer", *[c for c in _VERIFIER_COLUMNS if c in eval_set.columns]
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
    from dataclasses import replace

    from selfimprove_dagster.methods import star
    from selfimprove_dagster.quality import monitors

    scores: dict[float, float] = {}
    for temperature in grid:
        at = replace(sampling, temperature=temperature)
        generated = star.sample_generations(engine, train_set, round_, k, at, log=log)
        critiques = star.critique_generations(generated, train_set)
        kept = star.filter_accepted(generated, critiques, max_per_prompt)
        scores[temperature] = monitors.balance_score(critiques, kept, target=max_per_prompt)
    return scores
