"""STaR's rationalization: learn the problems the policy never solves.

    train prompts with no accepted sample ─ prompt + "Hint: the correct answer is X" ─>
    policy ─ verifier (on the reference, as usual) ─> accepted rationales
    ─ trained on the prompt WITHOUT the hint (source=rationalized, hint_used=X)

Zelikman et al., 2022 ("STaR: Bootstrapping Reasoning With Reasoning"), section 3.2:
without rationalization, STaR stops improving once the policy solves no new problems;
with the answer given as a hint the model can write a rationale for a problem it could
not solve, and training on that rationale (hint removed) teaches it the problem.

A rationale that talks about the hint ("as the hint says, ...") would teach the model
to cite a hint it will not have: such replies are rejected (reason `mentions_hint`).
Code rows are never rationalized (the reference answer is the solution itself).
"""

from __future__ import annotations

import json

import polars as pl

from selfimprove_dagster.engines.base import GenerationEngine, Sampling
from selfimprove_dagster.ids import generation_id
from selfimprove_dagster.methods import star
from selfimprove_dagster.progress import LogFn
from selfimprove_dagster.sources.answer_format import hinted_prompt
from selfimprove_dagster.verifiers.dispatch import verify_rows
from selfimprove_dagster.verifiers.verdict import Verdict

CRITIC = "rationalizer"
SOURCE = "rationalized"
# Words that give away that a rationale leans on the hint.
_HINT_WORDS = ("hint",)


def unsolved_prompts(
    prompts: pl.DataFrame, critiques: pl.DataFrame, max_prompts: int
) -> pl.DataFrame:
    """Train prompts none of whose samples the critic accepted (at most `max_prompts`,
    in prompt order), excluding code rows. Rows: the prompt table's columns."""
    solved = critiques.filter(pl.col("verdict") == "accept")["prompt_id"].unique()
    train = star.train_prompts(prompts).filter(~pl.col("prompt_id").is_in(solved))
    if "verifier" in train.columns:
        train = train.filter(pl.col("verifier").fill_null("numeric") != "code")
    return train.unique("prompt_id", keep="first", maintain_order=True).head(max_prompts)


def hint_text(row: dict) -> str:
    """The reference answer as the hint shows it (a choice gets its label and text)."""
    answer = str(row["answer"])
    if row.get("verifier") == "multiple_choice" and row.get("choices"):
        text = json.loads(row["choices"]).get(answer)
        return f"{answer} ({text})" if text else answer
    return answer


def rationalize(
    engine: GenerationEngine,
    unsolved: pl.DataFrame,
    round_: str,
    sampling: Sampling,
    samples: int,
    log: LogFn | None = None,
    reject_cut_off: bool = False,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Hinted samples for each unsolved prompt, judged by the prompt's verifier.

    `reject_cut_off` (rationale rounds): a sample that stopped at the token limit has
    no final answer line, and a number the verifier's last-resort search finds in it is
    not taken as the answer (reason `cut_off`, as in `star.critique_generations`): a
    hinted rationale cut off mid-way often still contains the hinted number.

    Returns (rationalizations, critiques). Rationalizations rows: round, generation_id,
    parent_generation_id (null), prompt_id, sample_index, prompt (without the hint),
    hinted_prompt, feedback (= hinted_prompt, for the refinements table), completion,
    completion_tokens, finish_reason, source ("rationalized"), hint_used. Critiques: one
    row per rationalization, critic "rationalizer".
    """
    rows = unsolved.to_dicts()
    if not rows:
        return _empty(), star.critiques_frame(_judge_frame([], round_), [], CRITIC)
    hints = [hint_text(r) for r in rows]
    hinted = [hinted_prompt(r["prompt"], h) for r, h in zip(rows, hints, strict=True)]
    if log:
        log(f"rationalization: {len(rows)} unsolved prompts x {samples} hinted samples")
    completions = engine.generate(hinted, samples, sampling, log=log)
    judged_rows = [rows[c.prompt_index] for c in completions]
    verdicts = [
        _no_hint_talk(c.text, v)
        for c, v in zip(
            completions,
            verify_rows(
                [c.text for c in completions],
                [
                    _verifier_row(r) | {"cut_off": reject_cut_off and c.finish_reason == "length"}
                    for c, r in zip(completions, judged_rows, strict=True)
                ],
            ),
            strict=True,
        )
    ]
    frame = pl.DataFrame(
        [
            {
                "round": round_,
                "generation_id": generation_id(
                    f"{round_}:{SOURCE}", r["prompt_id"], c.sample_index
                ),
                "parent_generation_id": None,
                "prompt_id": r["prompt_id"],
                "sample_index": c.sample_index,
                "prompt": r["prompt"],
                "hinted_prompt": hinted[c.prompt_index],
                "feedback": hinted[c.prompt_index],
                "completion": c.text,
                "completion_tokens": c.completion_tokens,
                "finish_reason": c.finish_reason,
                "source": SOURCE,
                "hint_used": hints[c.prompt_index],
            }
            for c, r in zip(completions, judged_rows, strict=True)
        ],
        schema=_SCHEMA,
    )
    judge = _judge_frame(
        [
            {**r, "generation_id": g}
            for r, g in zip(judged_rows, frame["generation_id"], strict=True)
        ],
        round_,
    )
    return frame, star.critiques_frame(judge, verdicts, CRITIC)


def rationalized_share(filtered: pl.DataFrame) -> float | None:
    """Share of the training rows written with a hint (None for an empty or pair set)."""
    if filtered.height == 0 or "source" not in filtered.columns:
        return None
    return float((filtered["source"] == SOURCE).mean())


# --- helpers ---------------------------------------------------------------------

_SCHEMA = {
    "round": pl.String,
    "generation_id": pl.String,
    "parent_generation_id": pl.String,
    "prompt_id": pl.String,
    "sample_index": pl.Int64,
    "prompt": pl.String,
    "hinted_prompt": pl.String,
    "feedback": pl.String,
    "completion": pl.String,
    "completion_tokens": pl.Int64,
    "finish_reason": pl.String,
    "source": pl.String,
    "hint_used": pl.String,
}


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=_SCHEMA)


def _verifier_row(row: dict) -> dict:
    keys = ("answer", *star.VERIFIER_COLUMNS)
    return {k: row[k] for k in keys if k in row}


def _judge_frame(rows: list[dict], round_: str) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "round": [round_] * len(rows),
            "generation_id": [r["generation_id"] for r in rows],
            "prompt_id": [r["prompt_id"] for r in rows],
            "answer": [str(r["answer"]) for r in rows],
        },
        schema={
            "round": pl.String,
            "generation_id": pl.String,
            "prompt_id": pl.String,
            "answer": pl.String,
        },
    )


def _no_hint_talk(text: str, verdict: Verdict) -> Verdict:
    if verdict.correct and any(word in text.lower() for word in _HINT_WORDS):
        return Verdict(False, verdict.extracted, "mentions_hint")
    return verdict
