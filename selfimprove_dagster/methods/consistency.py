"""Self-consistency critic: the majority answer of a prompt's k samples is its label.

Wang et al. (2023), "Self-Consistency Improves Chain of Thought Reasoning", and Huang
et al. (2022), "Large Language Models Can Self-Improve": sample k answers, take the
most common final answer as a pseudo-label, and train on the samples that agree with
it. No ground truth is needed, so the loop runs on unlabeled prompts. Where a
reference answer exists it is used only to *measure* the pseudo-labels (precision /
recall, the exploitation side of the B-STaR monitors), never to select.

    vote = majority_vote(["68", "68", "67", None], threshold=0.5)
    vote.label, vote.votes, vote.agreement  # "68", 2, 0.5
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import polars as pl

from selfimprove_dagster.methods import critique_rows
from selfimprove_dagster.verifiers.numeric import extract_answer

CRITIC = "majority_vote"


@dataclass(frozen=True)
class Vote:
    """The outcome of one prompt's vote."""

    label: str | None  # the majority answer, None when there is no clear majority
    votes: int  # samples giving the most common answer
    n: int  # samples voting (unanswered samples count: they did not agree)
    reason: str  # "majority", "tie", "below_threshold" or "no_answers"

    @property
    def agreement(self) -> float:
        return self.votes / self.n if self.n else 0.0


def majority_vote(answers: list[str | None], threshold: float) -> Vote:
    """Majority answer of one prompt's samples (normalized answers; None = no answer).

    A label is given when the most common answer is unique (a tie gives none: picking
    one would be a coin flip) and its share of *all* samples is at least `threshold`.
    """
    counts = Counter(a for a in answers if a is not None).most_common(2)
    if not counts:
        return Vote(None, 0, len(answers), "no_answers")
    (top, votes), runner_up = counts[0], counts[1][1] if len(counts) > 1 else 0
    if votes == runner_up:
        return Vote(None, votes, len(answers), "tie")
    if votes / len(answers) < threshold:
        return Vote(None, votes, len(answers), "below_threshold")
    return Vote(top, votes, len(answers), "majority")


def critique_by_majority(
    generations: pl.DataFrame, prompts: pl.DataFrame, threshold: float
) -> pl.DataFrame:
    """One verdict per generation: accept when its answer is its prompt's pseudo-label.

    Rows: round, generation_id, prompt_id, critic, verdict, correct (ground truth, null
    without a reference), extracted_answer, reference_answer, reason (agrees /
    disagrees / no_answer / no_majority:<vote reason>), score (the share of the
    prompt's samples giving this sample's answer), critique, pseudo_label, agreement.
    """
    references = dict(zip(prompts["prompt_id"], prompts["answer"], strict=True))
    rows = []
    for (prompt_id,), group in generations.sort("sample_index").group_by(
        "prompt_id", maintain_order=True
    ):
        answers = [extract_answer(text) for text in group["completion"]]
        vote = majority_vote(answers, threshold)
        shares = Counter(answers)
        for g, answer in zip(group.iter_rows(named=True), answers, strict=True):
            rows.append(_row(g, answer, vote, shares, references.get(prompt_id)))
    return pl.DataFrame(rows, schema=CRITIQUE_SCHEMA)


CRITIQUE_SCHEMA = {
    **critique_rows.CRITIQUE_SCHEMA,
    "pseudo_label": pl.String,
    "agreement": pl.Float64,
}


def _row(g: dict, answer: str | None, vote: Vote, shares: Counter, reference) -> dict:
    if answer is None:
        reason = "no_answer"
    elif vote.label is None:
        reason = f"no_majority:{vote.reason}"
    else:
        reason = "agrees" if answer == vote.label else "disagrees"
    label_text = (
        f"majority answer {vote.label} ({vote.votes}/{vote.n} samples)"
        if vote.label is not None
        else f"no pseudo-label ({vote.reason}, top answer {vote.votes}/{vote.n} samples)"
    )
    return {
        **critique_rows.critique_row(
            g,
            CRITIC,
            accepted=reason == "agrees",
            reference=reference,
            reason=reason,
            score=shares[answer] / vote.n if answer is not None else 0.0,
            critique=label_text,
        ),
        "pseudo_label": vote.label,
        "agreement": vote.agreement,
    }


def pseudo_label_quality(critiques: pl.DataFrame) -> dict[str, float | int | None]:
    """How good the round's pseudo-labels were, against ground truth where it exists.

    - pseudo_labeled_prompts: prompts that got a label.
    - pseudo_label_precision: labeled prompts whose label is the reference answer.
    - pseudo_label_recall: prompts with a right label / prompts where at least one
      sample was right (a label could only have been right there).
    None where a ratio is undefined (no labels, no reference answers, nothing solved).
    """
    original = critiques.filter(pl.col("critic") == CRITIC)
    per_prompt = original.group_by("prompt_id").agg(
        labeled=pl.col("pseudo_label").is_not_null().any(),
        label_right=(pl.col("verdict") == "accept").and_(pl.col("correct")).any(),
        solvable=pl.col("correct").any(),
        has_truth=pl.col("correct").is_not_null().all(),
    )
    labeled = per_prompt.filter("labeled")
    with_truth = per_prompt.filter("has_truth")
    labeled_with_truth = labeled.filter("has_truth")
    right = int(with_truth["label_right"].sum())
    solvable = int(with_truth["solvable"].sum())
    return {
        "pseudo_labeled_prompts": labeled.height,
        "pseudo_label_precision": right / labeled_with_truth.height
        if labeled_with_truth.height
        else None,
        "pseudo_label_recall": right / solvable if solvable else None,
    }
