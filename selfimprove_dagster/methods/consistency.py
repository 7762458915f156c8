"""Self-consistency critic: the majority answer of a prompt's k samples is its label.

Wang et al. (2023), "Self-Consistency Improves Chain of Thought Reasoning", and Huang
et al. (2022), "Large Language Models Can Self-Improve": sample k answers, take the
most common final answer as a pseudo-label, and train on the samples that agree with
it. No ground truth is needed, so the loop runs on unlabeled prompts. Where a
reference answer exists it is used only to *measure* the pseudo-labels (precision /
recall, the exploitation side of the B-STaR monitors), never to select.

    vote = majority_vote(["68", "68", "67", None], threshold=0.5)
    vote.label, vote.votes, vote.agreement  # "68", 2, 0.5

What a vote counts is each sample's answer under its prompt row's verifier
(`verifier` column; absent: numeric), and which answers are the same:

- numeric: the final number, canonical ("1,234" = "1234.0"); equal strings agree.
- multiple_choice: the chosen label ("B"); equal labels agree.
- math: the final answer as math-verify parses it; two answers agree when math-verify
  finds them equal ("\\frac{1}{2}", "0.5" and "1/2" are one answer). Each sample joins
  the first earlier class it equals; the class is named by its first answer's LaTeX,
  which is the pseudo-label (a refined answer is checked against it by the math
  verifier).
- code, and custom verifiers: refused when the round starts (`check_votable`). Two
  programs that differ in text may do the same thing, and the only behaviour we could
  compare them on is the row's tests, which are the reference: voting by test results
  is the verifier critic under another name. Use method `star` (or `grpo`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import polars as pl

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.methods import critique_rows
from selfimprove_dagster.verifiers.dispatch import verifier_name

CRITIC = "majority_vote"
# Verifiers whose answers a majority vote can compare (see the module docstring).
VOTABLE = ("numeric", "multiple_choice", "math")


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

    Answers are read and compared by the prompt row's verifier (`vote_keys`); ground
    truth (`correct`) only measures. Prompts whose verifier cannot be voted on (code,
    custom) are a SelfImproveError (`check_votable`).

    Rows: round, generation_id, prompt_id, critic, verdict, correct (ground truth, null
    without a reference), extracted_answer, reference_answer, reason (agrees /
    disagrees / no_answer / no_majority:<vote reason>), score (the share of the
    prompt's samples giving this sample's answer), critique, pseudo_label, agreement.
    """
    sampled = generations["prompt_id"].unique().to_list()
    check_votable(prompts.filter(pl.col("prompt_id").is_in(sampled)))
    problem = critique_rows.prompt_rows(prompts)
    ordered = generations.sort("sample_index")
    # Ground truth for the whole frame in one batch (measurement only, never the vote).
    truths = dict(
        zip(ordered["generation_id"], critique_rows.ground_truths(ordered, prompts), strict=True)
    )
    rows = []
    for (prompt_id,), group in ordered.group_by("prompt_id", maintain_order=True):
        row = problem.get(prompt_id) or {"answer": None}
        keys = vote_keys(group["completion"].to_list(), row)
        vote = majority_vote(keys, threshold)
        shares = Counter(keys)
        for g, key in zip(group.iter_rows(named=True), keys, strict=True):
            truth = truths[g["generation_id"]]
            rows.append(_row(g, key, vote, shares, row.get("answer"), truth))
    return pl.DataFrame(rows, schema=CRITIQUE_SCHEMA)


def check_votable(prompts: pl.DataFrame) -> None:
    """A SelfImproveError naming the problem and the fix when some prompt's verifier has
    no answers a majority vote can compare (code, custom); called when the round starts
    (the prompts step) and again by the critic."""
    names = (
        prompts["verifier"].fill_null("numeric").to_list() if "verifier" in prompts.columns else []
    )
    refused = Counter(
        n for n in (verifier_name({"verifier": v}) for v in names) if n not in VOTABLE
    )
    if not refused:
        return
    listed = ", ".join(f"{n} prompts use `{name}`" for name, n in refused.items())
    raise SelfImproveError(
        f"self_consistency cannot vote on these answers ({listed}): a majority over "
        "program texts (or a custom verifier's answers, which it only judges) says "
        "nothing about which answer is right, and comparing programs by their tests "
        "would be the verifier critic under another name",
        "use SELFIMPROVE_METHOD=star (or grpo) for code and custom-verifier tasks; "
        f"self_consistency votes on {', '.join(VOTABLE)} answers",
    )


def vote_keys(completions: list[str], row: dict) -> list[str | None]:
    """Each sample's answer as the vote counts it (None: no answer), under the prompt
    row's verifier: equal keys are the same answer (math: math-verify equivalence
    classes, each named by its first member's LaTeX)."""
    name = verifier_name(row)
    if name not in VOTABLE:
        check_votable(pl.DataFrame({"verifier": [name]}))
    if name != "math":
        return [critique_rows.extract_for(text, row) for text in completions]
    classes: list[tuple[list, str]] = []  # (parsed, latex) of each class's first answer
    keys: list[str | None] = []
    for text in completions:
        answer = critique_rows.math_answer(text)
        if answer is None:
            keys.append(None)
            continue
        parsed, latex = answer
        match = next((k for p, k in classes if critique_rows.same_math(p, parsed)), None)
        if match is None:
            classes.append((parsed, latex))
            match = latex
        keys.append(match)
    return keys


CRITIQUE_SCHEMA = {
    **critique_rows.CRITIQUE_SCHEMA,
    "pseudo_label": pl.String,
    "agreement": pl.Float64,
}


def _row(g: dict, answer: str | None, vote: Vote, shares: Counter, reference, truth) -> dict:
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
            truth=truth,
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
