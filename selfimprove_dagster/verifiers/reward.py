"""Rewards for online RL: the one adapter from any verifier to a TRL reward function.

A TRL reward function is `(prompts, completions, **columns) -> list[float]`: TRL passes
every dataset column as a keyword list, which is zipped back into problem rows here and
judged by each row's verifier (`verifiers.dispatch.verify_rows`), exactly as the
critiques and the held-out evaluation judge.

    rewards = [make_verifier_reward(), format_reward]
"""

from __future__ import annotations

from collections.abc import Callable

from selfimprove_dagster.text import last_message_text
from selfimprove_dagster.verifiers.dispatch import verify_rows
from selfimprove_dagster.verifiers.numeric import normalize_number

# Keyword arguments TRL adds to a reward call that are not dataset columns.
_TRL_KWARGS = {"trainer_state", "log_extra", "log_metric", "environments", "completion_ids"}


def make_verifier_reward(
    verifier: str | None = None, cut_off_at: int | None = None
) -> Callable[..., list[float]]:
    """A TRL reward function: 1.0 when the row's verifier (or `verifier`, for every
    row) accepts the completion.

    `cut_off_at` (rationale rounds: `max_completion_length`): a completion of that many
    tokens stopped at the limit, and the verifier judges it with `cut_off` set (no
    last-resort answer, `star.critique_generations`' rule).

    It also logs, per rollout, the verdict's extracted answer and reason, the reference
    answer, the prompt id and the completion's token count as extra columns of TRL's
    completions table, so each rollout row can be written like a critique row.
    """

    def verifier_reward(prompts, completions, **kwargs) -> list[float]:
        n = len(completions)
        columns = {
            k: v
            for k, v in kwargs.items()
            if k not in _TRL_KWARGS and isinstance(v, list | tuple) and len(v) == n
        }
        rows = [{k: v[i] for k, v in columns.items()} for i in range(n)]
        ids = kwargs.get("completion_ids")
        if cut_off_at is not None and ids:
            rows = [r | {"cut_off": len(t) >= cut_off_at} for r, t in zip(rows, ids, strict=True)]
        verdicts = verify_rows([last_message_text(c) for c in completions], rows, verifier)
        log_extra = kwargs.get("log_extra")
        if log_extra is not None:
            log_extra("prompt_id", [r.get("prompt_id") for r in rows])
            log_extra("reference_answer", [str(r.get("answer")) for r in rows])
            log_extra("correct", [v.correct for v in verdicts])
            log_extra("extracted_answer", [v.extracted for v in verdicts])
            log_extra("reason", [v.reason for v in verdicts])
            log_extra("completion_tokens", [len(t) for t in ids] if ids else [None] * n)
        return [1.0 if v.correct else 0.0 for v in verdicts]

    return verifier_reward


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the reply is just a number (what the default task's prompt asks for)."""
    return [
        1.0 if normalize_number(last_message_text(c).strip()) is not None else 0.0
        for c in completions
    ]
