"""Self-Refine / SELF / Re-ReST: the policy rewrites its rejected answers from feedback.

- Re-ReST (Dou et al., 2024, "Re-ReST: Reflection-Reinforced Self-Training"): a
  rejected sample gets the critic's message ("The answer 67 is wrong.") and the policy
  writes a refined answer; refined answers that pass join the training set, trained
  on the *original* prompt.
- SELF (Lu et al., 2023) / Self-Refine (Madaan et al., 2023): the feedback is the
  policy's own critique of its answer (`templates/self_critique.txt`).

The refined answer is checked by the round's critic (the verifier under `star`, the
pseudo-label under `self_consistency`), through the prompt row's own verifier
(`verifiers.dispatch.verify_row` with the row's `verifier`, `choices`, `tests`, ...:
numeric, multiple choice, math, code, custom), with the label as the row's answer.
Two numbers say whether self-correction works (Yang et al., 2024, "Confidence vs
Critique: A Decomposition of Self-Correction Capability for LLMs"):

- critique half: rejected samples the refinement *repaired*;
- confidence half: accepted samples (a probe, never trained on) the same refinement
  step *broke*. Under critic feedback a probe gets a neutral "check your answer"
  message, since the critic's message would give the verdict away.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import polars as pl

from selfimprove_dagster.engines.base import GenerationEngine, Sampling
from selfimprove_dagster.ids import refined_generation_id
from selfimprove_dagster.methods import critique_rows
from selfimprove_dagster.progress import LogFn
from selfimprove_dagster.prompting import load_template, render
from selfimprove_dagster.verifiers.dispatch import verify_rows

CRITIC = "refiner"
Feedback = Literal["critic", "self"]
# What a probed (accepted) sample is told under critic feedback.
NEUTRAL_FEEDBACK = "Check your answer and correct it if it is wrong."


def select_for_refinement(
    generations: pl.DataFrame, critiques: pl.DataFrame, max_rows: int, probe_rows: int
) -> pl.DataFrame:
    """The samples to refine: for each prompt with no accepted sample, its first rejected
    one (at most `max_rows`: those are the prompts refinement can add to the training
    set); and up to `probe_rows` accepted samples (one per prompt) as the probe.

    Rows: the generation's columns plus verdict, reason, extracted_answer, critique
    and `probe` (True for the accepted samples of the probe).
    """
    judged = generations.join(
        critiques.select("generation_id", "verdict", "reason", "extracted_answer", "critique"),
        on="generation_id",
    ).sort("prompt_id", "sample_index")
    solved = judged.filter(pl.col("verdict") == "accept")["prompt_id"].unique()
    rejected = (
        judged.filter(~pl.col("prompt_id").is_in(solved))
        .group_by("prompt_id", maintain_order=True)
        .first()
        .head(max_rows)
        .with_columns(probe=pl.lit(False))
    )
    probes = (
        judged.filter(pl.col("verdict") == "accept")
        .group_by("prompt_id", maintain_order=True)
        .first()
        .head(probe_rows)
        .with_columns(probe=pl.lit(True))
    )
    return pl.concat([rejected, probes])


def critic_feedback(row: dict) -> str:
    """The critic's message for a rejected sample, without the reference answer. A code
    sample (the verifier's critique says "the code fails: ...") is told how it failed
    (execution feedback, as in Re-ReST), not handed its whole program back."""
    critique = row.get("critique") or ""
    if critique.startswith("the code fails"):
        return f"The code fails: {row['reason']}."
    if row["extracted_answer"] is None:
        return "The reply does not state a final answer."
    if row["reason"] == "disagrees":
        return f"The answer {row['extracted_answer']} disagrees with most of your other answers."
    return f"The answer {row['extracted_answer']} is wrong."


def self_critique_prompt(question: str, answer: str) -> str:
    return render(load_template("self_critique.txt"), question=question, answer=answer)


def refine_prompt(question: str, answer: str, feedback: str) -> str:
    return render(load_template("refine.txt"), question=question, answer=answer, feedback=feedback)


def refine_samples(
    engine: GenerationEngine,
    selected: pl.DataFrame,
    feedback: Feedback,
    sampling: Sampling,
    critique_tokens: int,
    log: LogFn | None = None,
) -> pl.DataFrame:
    """Feedback for each selected sample, then one refined answer (greedy).

    Rows: round, generation_id (of the refined answer), parent_generation_id,
    prompt_id, prompt, original_completion, probe, feedback_source (critic / self /
    neutral), feedback, completion, completion_tokens, finish_reason.
    """
    rows = selected.to_dicts()
    greedy = replace(sampling, temperature=0.0)
    if feedback == "self":
        critique_sampling = replace(greedy, max_new_tokens=critique_tokens)
        critiques = engine.generate(
            [self_critique_prompt(r["prompt"], r["completion"]) for r in rows],
            1,
            critique_sampling,
            log=log,
        )
        texts = [(c.text.strip(), "self") for c in critiques]
    else:
        texts = [
            (NEUTRAL_FEEDBACK, "neutral") if r["probe"] else (critic_feedback(r), "critic")
            for r in rows
        ]
    prompts = [
        refine_prompt(r["prompt"], r["completion"], text)
        for r, (text, _) in zip(rows, texts, strict=True)
    ]
    refined = engine.generate(
        prompts,
        1,
        greedy,
        log=log,
    )
    return pl.DataFrame(
        [
            {
                "round": r["round"],
                "generation_id": refined_generation_id(r["generation_id"]),
                "parent_generation_id": r["generation_id"],
                "prompt_id": r["prompt_id"],
                "sample_index": r["sample_index"],
                "prompt": r["prompt"],
                "original_completion": r["completion"],
                "probe": r["probe"],
                "feedback_source": source,
                "feedback": text,
                "completion": c.text,
                "completion_tokens": c.completion_tokens,
                "finish_reason": c.finish_reason,
            }
            for r, (text, source), c in zip(rows, texts, refined, strict=True)
        ],
        schema=REFINEMENT_SCHEMA,
    )


REFINEMENT_SCHEMA = {
    "round": pl.String,
    "generation_id": pl.String,
    "parent_generation_id": pl.String,
    "prompt_id": pl.String,
    "sample_index": pl.Int64,
    "prompt": pl.String,
    "original_completion": pl.String,
    "probe": pl.Boolean,
    "feedback_source": pl.String,
    "feedback": pl.String,
    "completion": pl.String,
    "completion_tokens": pl.Int64,
    "finish_reason": pl.String,
}


def critique_refinements(
    refinements: pl.DataFrame,
    labels: dict[str, str | None],
    references: dict[str, object],
    prompts: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The round's critic on each refined answer: accepted when the prompt row's
    verifier accepts it with the prompt's label as the answer (`labels`: the reference
    under star, the pseudo-label under self-consistency; a code row's tests decide).

    `prompts` gives each prompt's verifier columns (`verifier`, `choices`, `tests`,
    `test_setup`, `entry_point`); without it every row is numeric.

    Rows (the critiques schema, critic "refiner"): verdict, correct (ground truth),
    reason = outcome (repaired / still_rejected for rejected samples; kept / broken for
    the probe), score (1/0), critique = the feedback the refinement was given.
    """
    problem = critique_rows.prompt_rows(prompts) if prompts is not None else {}
    items = list(refinements.iter_rows(named=True))
    rows_of = [problem.get(r["prompt_id"], {}) for r in items]
    # The accept check: the row's verifier, the label standing in for the answer.
    checked = [
        i for i, r in enumerate(items) if _label_given(labels.get(r["prompt_id"]), rows_of[i])
    ]
    verdicts = verify_rows(
        [items[i]["completion"] for i in checked],
        [{**rows_of[i], "answer": labels.get(items[i]["prompt_id"])} for i in checked],
    )
    accepted_at = {i for i, v in zip(checked, verdicts, strict=True) if v.correct}
    # Ground truth (measurement only): the row's verifier against the reference.
    truths = critique_rows.truths_for(
        [r["completion"] for r in items],
        [
            {**row, "answer": references.get(r["prompt_id"])}
            for r, row in zip(items, rows_of, strict=True)
        ],
    )
    rows = []
    for i, r in enumerate(items):
        reference = references.get(r["prompt_id"])
        accepted = i in accepted_at
        if r["probe"]:
            outcome = "kept" if accepted else "broken"
        else:
            outcome = "repaired" if accepted else "still_rejected"
        rows.append(
            critique_rows.critique_row(
                r,
                CRITIC,
                accepted=accepted,
                reference=reference,
                reason=outcome,
                score=1.0 if accepted else 0.0,
                critique=r["feedback"],
                truth=truths[i],
            )
        )
    return pl.DataFrame(rows, schema=critique_rows.CRITIQUE_SCHEMA)


def _label_given(label: object, row: dict) -> bool:
    # A code row is judged by its tests: its label (the reference program) may be empty.
    return label is not None or (row.get("verifier") == "code" and bool(row.get("tests")))


def refinement_stats(critiques: pl.DataFrame) -> dict[str, float | int | None]:
    """Critique half (rejected samples repaired) and confidence half (probed correct
    samples broken) of the round's refinement, from the refiner's critique rows."""
    refined = critiques.filter(pl.col("critic") == CRITIC)
    outcomes = dict(refined.group_by("reason").len().iter_rows())
    attempted = outcomes.get("repaired", 0) + outcomes.get("still_rejected", 0)
    probed = outcomes.get("kept", 0) + outcomes.get("broken", 0)
    return {
        "refined": attempted,
        "repaired": outcomes.get("repaired", 0),
        "repair_rate": outcomes.get("repaired", 0) / attempted if attempted else None,
        "probed": probed,
        "broken": outcomes.get("broken", 0),
        "broken_rate": outcomes.get("broken", 0) / probed if probed else None,
    }
