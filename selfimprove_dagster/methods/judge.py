"""Self-Judge / Self-Rewarding critic: the policy scores its own answers with a rubric.

Yuan et al. (2024), "Self-Rewarding Language Models": the model acts as its own judge
with a rubric prompt (`templates/judge_rubric.txt`), its scores are averaged over a
few sampled judgements (the paper samples 3), and per prompt the best- and
worst-scored answers become a preference pair for DPO. Each distinct (prompt, answer)
is judged once, so the k copies of a common answer cost one judgement.

The judge's reply starts with "Score:" (a response prefix): without it SmolLM2-135M
never wrote a score in our trials (0 of 32 replies), with it most replies begin with
a number. A reply without a readable score counts as unparseable and is left out of
the mean; an answer with no readable score at all gets a null score. Nothing is
guessed.

    parse_judge_score("Score: 4. The answer is right.")  # 4.0
    parse_judge_score("I think it is good")              # None

The judge works for every task type: the rubric asks about the response, not a
number, and the judge sees the prompt as the policy saw it (with its options, or the
function to write). Only ground truth, recorded to measure the judge (`correct`,
`extracted_answer`), depends on the task type: it comes from the prompt row's
verifier (`critique_rows.ground_truths`: numeric, multiple choice, math, code tests in
the sandbox, custom), never from the judge's scores.
"""

from __future__ import annotations

import re

import polars as pl

from selfimprove_dagster.engines.base import GenerationEngine, Sampling
from selfimprove_dagster.methods import critique_rows
from selfimprove_dagster.progress import LogFn
from selfimprove_dagster.prompting import load_template, render

CRITIC = "policy_judge"
RUBRIC_TEMPLATE = "judge_rubric.txt"
MAX_POINTS = 5  # the rubric's scale: 1..5 (0 is read too)
SCORE_PREFIX = "Score:"  # the judge's reply starts here

# "Score: 4", "score = 4/5", "**Score:** 3 points"; the first such phrase wins.
_SCORE_RE = re.compile(r"score\W{0,4}(?:is\s+)?(\d+(?:\.\d+)?)(?:\s*/\s*(\d+))?", re.IGNORECASE)
# A reply that is only a number ("4", "4/5", "4 points").
_BARE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d+)|points?)?\s*[.!]?\s*$", re.IGNORECASE)


def judge_prompt(question: str, answer: str) -> str:
    return render(load_template(RUBRIC_TEMPLATE), question=question, answer=answer)


def parse_judge_score(text: str) -> float | None:
    """The rubric's points (0..5) in a judge reply; None when there is no readable score.

    A score out of another scale ("8/10") is rescaled to 5 points; a value outside the
    scale ("Score: 12") is unreadable, not clipped.
    """
    match = _SCORE_RE.search(text) or _BARE_RE.match(text)
    if match is None:
        return None
    value, scale = float(match.group(1)), match.group(2)
    if scale is not None:
        if int(scale) <= 0:
            return None
        value = value * MAX_POINTS / int(scale)
    return value if 0 <= value <= MAX_POINTS else None


def critique_by_judge(
    engine: GenerationEngine,
    generations: pl.DataFrame,
    prompts: pl.DataFrame,
    sampling: Sampling,
    judge_samples: int,
    accept_points: float,
    log: LogFn | None = None,
) -> pl.DataFrame:
    """The policy's mean rubric score for every generation (`judge_samples` sampled
    judgements per distinct answer of a prompt).

    Rows: round, generation_id, prompt_id, critic, verdict (accept when the mean points
    are at least `accept_points`), correct (ground truth, null without a reference),
    extracted_answer, reference_answer, reason (judged/unparseable), score (mean
    points / 5, null when no reply had a score), critique (the judge's replies),
    judge_points, judge_replies, judge_parsed (replies with a readable score).
    """
    keyed = generations.with_columns(_key=pl.col("completion").str.strip_chars())
    distinct = keyed.unique(subset=["prompt_id", "_key"], keep="first", maintain_order=True)
    judge_prompts = [
        judge_prompt(q, a) for q, a in zip(distinct["prompt"], distinct["_key"], strict=True)
    ]
    replies = engine.generate(
        judge_prompts, judge_samples, sampling, log=log, response_prefix=SCORE_PREFIX
    )
    texts = [SCORE_PREFIX + c.text for c in replies]
    per_answer = [
        texts[i * judge_samples : (i + 1) * judge_samples] for i in range(distinct.height)
    ]
    judged = distinct.select("prompt_id", "_key").with_columns(
        _replies=pl.Series(per_answer, dtype=pl.List(pl.String))
    )
    references = dict(zip(prompts["prompt_id"], prompts["answer"], strict=True))
    scored = keyed.join(judged, on=["prompt_id", "_key"], how="left", maintain_order="left")
    truths = critique_rows.ground_truths(scored, prompts)  # measurement only
    rows = []
    for g, truth in zip(scored.iter_rows(named=True), truths, strict=True):
        scores = [s for s in map(parse_judge_score, g["_replies"]) if s is not None]
        points = sum(scores) / len(scores) if scores else None
        rows.append(
            {
                **critique_rows.critique_row(
                    g,
                    CRITIC,
                    accepted=points is not None and points >= accept_points,
                    reference=references.get(g["prompt_id"]),
                    reason="unparseable" if points is None else "judged",
                    score=None if points is None else points / MAX_POINTS,
                    critique=" | ".join(g["_replies"]),
                    truth=truth,
                ),
                "judge_points": points,
                "judge_replies": len(g["_replies"]),
                "judge_parsed": len(scores),
            }
        )
    return pl.DataFrame(rows, schema=CRITIQUE_SCHEMA)


CRITIQUE_SCHEMA = {
    **critique_rows.CRITIQUE_SCHEMA,
    "judge_points": pl.Float64,
    "judge_replies": pl.Int64,
    "judge_parsed": pl.Int64,
}


def preference_pairs(
    generations: pl.DataFrame, critiques: pl.DataFrame, margin: float
) -> pl.DataFrame:
    """Per prompt, the best- vs worst-scored answers as a DPO pair, when their scores
    differ by at least `margin` (on the 0..1 score). Unscored answers take no part;
    among equal scores the lowest sample index wins, so the choice is deterministic.

    Rows: round, generation_id (the chosen answer's), prompt_id, prompt, completion
    (chosen), rejected_generation_id, rejected_completion, chosen_score,
    rejected_score, margin, source ("generated").
    """
    scored = (
        generations.select(
            "round", "generation_id", "prompt_id", "sample_index", "prompt", "completion"
        )
        .join(critiques.select("generation_id", "score"), on="generation_id", how="inner")
        .filter(pl.col("score").is_not_null())
    )
    best = (
        scored.sort(["score", "sample_index"], descending=[True, False])
        .group_by("prompt_id", maintain_order=True)
        .first()
    )
    worst = (
        scored.sort(["score", "sample_index"], descending=[False, False])
        .group_by("prompt_id", maintain_order=True)
        .first()
    )
    pairs = best.join(worst, on="prompt_id", suffix="_rejected").with_columns(
        margin=pl.col("score") - pl.col("score_rejected")
    )
    return (
        pairs.filter(pl.col("margin") >= margin)
        .filter(_stripped("completion") != _stripped("completion_rejected"))
        .sort("prompt_id")
        .select(
            "round",
            "generation_id",
            "prompt_id",
            "prompt",
            "completion",
            rejected_generation_id=pl.col("generation_id_rejected"),
            rejected_completion=pl.col("completion_rejected"),
            chosen_score=pl.col("score"),
            rejected_score=pl.col("score_rejected"),
            margin=pl.col("margin"),
            source=pl.lit("generated"),
        )
    )


def _stripped(column: str) -> pl.Expr:
    return pl.col(column).str.strip_chars()


def judge_quality(
    critiques: pl.DataFrame, pairs: pl.DataFrame | None = None
) -> dict[str, float | int | None]:
    """How good the judge was, against ground truth where it exists.

    - judge_unparseable_rate: share of judge replies without a readable score.
    - judge_unscored: generations none of whose judge replies had a score.
    - judge_accuracy: verdicts (accept/reject) that match ground truth.
    - pair_accuracy: among pairs whose two answers differ in correctness, the share
      whose chosen answer is the correct one (what DPO will push towards).
    - pairs: preference pairs built.
    The pair figures are left out when `pairs` is not given.
    """
    judged = critiques.filter(pl.col("critic") == CRITIC)
    truth = judged.filter(pl.col("correct").is_not_null())
    agree = truth.filter((pl.col("verdict") == "accept") == pl.col("correct")).height
    replies = int(judged["judge_replies"].sum())
    quality = {
        "judge_unparseable_rate": (
            int((judged["judge_replies"] - judged["judge_parsed"]).sum()) / replies
            if replies
            else None
        ),
        "judge_unscored": int(judged["score"].is_null().sum()),
        "judge_accuracy": agree / truth.height if truth.height else None,
    }
    if pairs is None:
        return quality
    correct = dict(zip(critiques["generation_id"], critiques["correct"], strict=True))
    decided = [
        (correct.get(c), correct.get(r))
        for c, r in zip(pairs["generation_id"], pairs["rejected_generation_id"], strict=True)
    ]
    decided = [(c, r) for c, r in decided if c is not None and r is not None and c != r]
    return {
        **quality,
        "pair_accuracy": sum(c for c, _ in decided) / len(decided) if decided else None,
        "pairs": pairs.height,
    }
