"""Data-quality gates as pure functions: each returns a `GateResult` that an
`@dg.asset_check` converts into an `AssetCheckResult` (observed value, threshold,
and a message naming the problem and the fix when it fails)."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from selfimprove_dagster.text import normalize_prompt


@dataclass(frozen=True)
class GateResult:
    passed: bool
    observed: Any
    threshold: Any
    message: str
    details: dict[str, Any] = field(default_factory=dict)


def gate_min_rows(frame: pl.DataFrame, minimum: int, what: str = "filtered set") -> GateResult:
    """A round must have at least `minimum` rows to train on."""
    rows = frame.height
    passed = rows >= minimum
    message = (
        f"{what} has {rows} rows (minimum {minimum})"
        if passed
        else f"The {what} has {rows} rows, fewer than the minimum {minimum}: the round cannot "
        "train. Fix: sample more (raise samples_per_prompt or temperature), use more or easier "
        "prompts, or lower min_filtered"
    )
    return GateResult(passed, rows, minimum, message)


def gate_unique_ids(frame: pl.DataFrame, column: str = "generation_id") -> GateResult:
    """No id may appear twice (a duplicate would be trained on twice)."""
    duplicated = frame.filter(pl.col(column).is_duplicated())[column].unique().to_list()
    passed = not duplicated
    message = (
        f"all {frame.height} `{column}` values are unique"
        if passed
        else f"{len(duplicated)} `{column}` values appear more than once (e.g. {duplicated[:3]}). "
        "Fix: rematerialize the upstream assets of this round; do not append to their files"
    )
    return GateResult(passed, len(duplicated), 0, message, {"duplicates": duplicated[:10]})


def gate_training_ran(manifest: dict[str, Any]) -> GateResult:
    """Loss is finite and every planned optimizer step ran (catches silent under-training)."""
    steps, planned = manifest.get("optimizer_steps", 0), manifest.get("planned_steps", 0)
    loss = manifest.get("final_loss")
    finite = loss is not None and math.isfinite(loss)
    passed = finite and steps >= planned
    message = (
        f"{steps}/{planned} optimizer steps, final loss {loss:.4f}"
        if passed
        else f"Training is suspect: {steps}/{planned} optimizer steps, final loss {loss}. "
        "Fix: lower the learning rate if the loss is not finite; check the filtered set and "
        "batch size if steps are missing"
    )
    return GateResult(passed, {"steps": steps, "final_loss": loss}, {"steps": planned}, message)


# --- contamination and regression ------------------------------------------------------

# The quantities of a problem, in order: numbers ("23", "1,234", "0.5") and the operators
# between them ("23 + 45" and "23 - 45" are different problems).
_QUANTITY_RE = re.compile(r"\d+(?:[.,]\d+)*|[-+*/×÷^%=<>]")
# Contaminated prompts listed in a failed gate's details.
MAX_LISTED = 10


def contamination_matches(
    train_texts: list[str], eval_texts: list[str], near_duplicate_threshold: float = 0.9
) -> dict[str, tuple[str, str, float]]:
    """Train text -> (eval text, "exact" or "near", similarity) for every train prompt
    that repeats an eval prompt by `gate_no_contamination`'s test (loaders use it to
    drop such rows up front)."""
    index = _eval_index(eval_texts)
    return {
        text: found
        for text in dict.fromkeys(train_texts)
        if (found := _eval_match(text, index, near_duplicate_threshold)) is not None
    }


def gate_no_contamination(
    train_rows: pl.DataFrame,
    eval_prompts: pl.DataFrame,
    near_duplicate_threshold: float = 0.9,
) -> GateResult:
    """No training row may repeat a held-out eval prompt, exactly or nearly.

    Exact: equal normalized text. Near: a character similarity ratio (difflib) of at
    least `near_duplicate_threshold` between the normalized texts AND the same numbers
    and operators in the same order. The second condition is what makes the ratio usable
    on math: "What is 23 + 45?" and "What is 23 + 46?" are 94% identical by characters
    but are different problems, while a re-spaced or re-punctuated copy with the same
    quantities is the same problem. The order counts because "45 - 23" and "23 - 45"
    differ, and because the built-in tasks hold "A + B" and "B + A" as distinct problems
    (a 200/200 addition split has several such pairs): comparing number multisets would
    stop every normal round. Grouping by quantities first also keeps the cost low: only
    prompts in the same group are compared, after a vectorized upper bound on the ratio
    (~0.03 s for 400 x 200 prompts without numbers, which all share one group).
    """
    matches = contamination_matches(
        train_rows["prompt"].drop_nulls().unique(maintain_order=True).to_list(),
        eval_prompts["prompt"].to_list(),
        near_duplicate_threshold,
    )
    hits = train_rows.filter(pl.col("prompt").is_in(list(matches)))
    listed = [
        {"prompt": text, "eval_prompt": eval_text, "match": kind, "similarity": round(ratio, 3)}
        for text, (eval_text, kind, ratio) in list(matches.items())[:MAX_LISTED]
    ]
    passed = hits.height == 0
    message = (
        f"none of {train_rows.height} rows repeats one of {eval_prompts.height} held-out "
        f"prompts (near-duplicate threshold {near_duplicate_threshold})"
        if passed
        else f"{hits.height} rows ({len(matches)} distinct prompts) repeat held-out eval prompts, "
        f"e.g. {listed[0]['prompt']!r} ~ {listed[0]['eval_prompt']!r}: training on them would "
        "inflate the held-out score. Fix: drop them from the train split (make the task's "
        "train and eval splits disjoint, or set SELFIMPROVE_DROP_CONTAMINATED=true to drop "
        "them at load time, each recorded with the eval prompt it matched) and rematerialize "
        "the round"
    )
    return GateResult(
        passed, hits.height, 0, message, {"contaminated_prompts": listed} if listed else {}
    )


def gate_no_regression(
    accuracy_before: float, accuracy_after: float, tolerance: float
) -> GateResult:
    """The new checkpoint may not score lower than its policy by more than `tolerance`."""
    floor = accuracy_before - tolerance
    # Slack for float noise: 0.6 - 0.1 is 0.49999999999999994, and 0.5 must pass.
    passed = accuracy_after >= floor - 1e-9
    delta = accuracy_after - accuracy_before
    message = (
        f"held-out accuracy {accuracy_before:.1%} -> {accuracy_after:.1%} "
        f"({delta:+.1%}, tolerance {tolerance:.1%})"
        if passed
        else f"Held-out accuracy regressed {accuracy_before:.1%} -> {accuracy_after:.1%} "
        f"({delta:+.1%}), beyond the tolerance {tolerance:.1%}: do not promote this checkpoint. "
        "Fix: inspect the filtered set (wrong or degenerate samples), lower the learning rate or "
        "epochs, or raise the tolerance if the held-out set is small and noisy"
    )
    details = {"accuracy_before": accuracy_before, "accuracy_after": accuracy_after}
    return GateResult(passed, accuracy_after, floor, message, {**details, "delta": delta})


class _Group:
    """Eval prompts that share their quantities, with per-character counts so that an
    upper bound on the similarity ratio is one vectorized step for all of them."""

    def __init__(self) -> None:
        self.normalized: list[str] = []
        self.originals: list[str] = []
        self._alphabet: dict[str, int] = {}
        self._counts: Any = None  # (prompts x characters) counts, built on first use
        self._lengths: Any = None

    def add(self, normalized: str, original: str) -> None:
        self.normalized.append(normalized)
        self.originals.append(original)
        self._counts = None

    def candidates(self, text: str, threshold: float) -> list[int]:
        """Indices of eval prompts whose ratio with `text` can reach `threshold`.

        difflib's ratio is 2·M / (len_a + len_b) with M matched characters, and M is at
        most the multiset intersection of the two strings' characters (difflib's
        `quick_ratio`); computing that bound for all prompts of the group at once is
        what keeps 400 x 200 number-free prompts (a single group) fast.
        """
        import numpy as np

        if self._counts is None:
            self._build()
        own = np.zeros(len(self._alphabet), np.int32)
        for char in text:  # a character no eval prompt of the group has cannot match
            if char in self._alphabet:
                own[self._alphabet[char]] += 1
        shared = np.minimum(self._counts, own).sum(axis=1)
        bound = 2 * shared / np.maximum(self._lengths + len(text), 1)
        return np.flatnonzero(bound >= threshold).tolist()

    def _build(self) -> None:
        import numpy as np

        self._alphabet = {c: i for i, c in enumerate(sorted(set("".join(self.normalized))))}
        self._counts = np.zeros((len(self.normalized), len(self._alphabet)), np.int32)
        for row, prompt in enumerate(self.normalized):
            for char in prompt:
                self._counts[row, self._alphabet[char]] += 1
        self._lengths = np.array([len(p) for p in self.normalized])


# Eval prompts by normalized text, and grouped by the quantities they contain.
_EvalIndex = tuple[dict[str, str], dict[tuple[str, ...], _Group]]


def _eval_index(texts: list[str]) -> _EvalIndex:
    exact: dict[str, str] = {}
    groups: dict[tuple[str, ...], _Group] = {}
    for text in texts:
        normalized = normalize_prompt(text)
        exact.setdefault(normalized, text)
        groups.setdefault(_quantities(normalized), _Group()).add(normalized, text)
    return exact, groups


def _quantities(normalized: str) -> tuple[str, ...]:
    """Numbers and operators in order: what makes two similar prompts one problem."""
    return tuple(_QUANTITY_RE.findall(normalized))


def _eval_match(text: str, index: _EvalIndex, threshold: float) -> tuple[str, str, float] | None:
    """(eval prompt, "exact" or "near", similarity) of the first eval prompt `text` repeats."""
    exact, groups = index
    normalized = normalize_prompt(text)
    if normalized in exact:
        return exact[normalized], "exact", 1.0
    group = groups.get(_quantities(normalized))
    if group is None:
        return None
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(normalized)  # difflib caches its index of the second sequence
    for i in group.candidates(normalized, threshold):
        matcher.set_seq1(group.normalized[i])
        ratio = matcher.ratio()
        if ratio >= threshold:
            return group.originals[i], "near", ratio
    return None


def gate_generates(prompt: str, text: str, completion_tokens: int) -> GateResult:
    """A freshly trained checkpoint must produce at least one token of text."""
    passed = completion_tokens > 0 and bool(text.strip())
    message = (
        f"generated {completion_tokens} tokens: {text[:60]!r}"
        if passed
        else "The checkpoint loaded but generated nothing. Fix: check the training loss and "
        "learning rate of this round; rematerialize `checkpoint`"
    )
    return GateResult(passed, completion_tokens, 1, message, {"prompt": prompt, "completion": text})


def gate_critic_readable(critiques: pl.DataFrame, max_unscored: float) -> GateResult:
    """WARN signal: the critic left too many generations without a score (a judge
    whose replies had no readable score). Critics that always score pass."""
    rows = critiques.height
    unscored = int(critiques["score"].is_null().sum()) if rows else 0
    share = unscored / rows if rows else 0.0
    passed = share <= max_unscored
    message = (
        f"{unscored} of {rows} generations unscored ({share:.0%}, at most {max_unscored:.0%})"
        if passed
        else f"The critic left {unscored} of {rows} generations without a score ({share:.0%}, "
        f"more than {max_unscored:.0%}): they take no part in pairs or acceptance. Fix: raise "
        "judge_samples or judge_max_new_tokens, or use a stronger policy as the judge"
    )
    return GateResult(passed, share, max_unscored, message, {"unscored": unscored})


def gate_truncation(generations: pl.DataFrame, max_share: float) -> GateResult:
    """WARN signal: the share of samples cut off by the token limit (finish_reason
    "length"). A short word problem asked at 16 new tokens mostly stops before its
    answer: the round then learns nothing and accuracy stays at its base."""
    rows = generations.height
    cut = int((generations["finish_reason"] == "length").sum()) if rows else 0
    share = cut / rows if rows else 0.0
    budget = (
        generations["max_new_tokens"].max() if "max_new_tokens" in generations.columns else None
    )
    passed = share <= max_share
    message = (
        f"{cut} of {rows} samples stopped at the token limit ({share:.0%}, at most {max_share:.0%})"
        if passed
        else f"{cut} of {rows} samples ({share:.0%}) stopped at the token limit of {budget} new "
        "tokens, most before writing an answer: the verifier rejects them and the round learns "
        "little. Fix: raise SELFIMPROVE_MAX_NEW_TOKENS (GeneratorResource.max_new_tokens; "
        "answer_format=rationale defaults to 256), or ask for shorter answers"
    )
    return GateResult(
        passed, share, max_share, message, {"truncated": cut, "max_new_tokens": budget}
    )
