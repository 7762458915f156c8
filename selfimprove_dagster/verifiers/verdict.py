"""The verdict every verifier returns: one shape for all task types.

GRPO rewards, critiques, evaluation and the filter all read this dataclass, so its
fields and their meaning are a contract: `correct` decides, `extracted` is what the
verifier read from the completion (None when it found no answer), `reason` is a short
machine-readable word ("correct", "wrong_answer", "no_answer", "test_failed", ...)
optionally followed by ": detail" for people.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """The verifier's decision on one completion."""

    correct: bool
    extracted: str | None  # the normalized answer found in the completion, if any
    reason: str  # "correct", "wrong_answer", "no_answer", or a verifier-specific reason
    sandbox: str | None = None  # code only: what isolated the program ("bubblewrap" / "none")
