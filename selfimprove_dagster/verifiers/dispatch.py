"""Pick the verifier for a row and run it: the one entry point callers use.

    verify_row(completion, row)            -> Verdict   # one completion
    verify_rows(completions, rows)         -> [Verdict] # a batch, grouped by verifier

The verifier is, in order: the `verifier` argument, the row's `verifier` column, or
"numeric". Names: `numeric`, `multiple_choice`, `math`, `code`, or `module:function`
(a custom verifier, see `verifiers.custom`). A row carries `answer` and, depending on
the verifier, `choices` (multiple choice), `tests` / `test_setup` / `entry_point`
(code). Each verifier module is imported only when a row needs it, so numeric judging
never pays for sympy or the sandbox.

`verify_rows` groups rows by verifier and hands each group to the verifier's batch
function where it has one (the code sandbox runs candidates in parallel on all cores).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.text import last_message_text
from selfimprove_dagster.verifiers.verdict import Verdict

DEFAULT_VERIFIER = "numeric"

# Built-in verifier name -> module holding `verify_row(completion, row)` and
# optionally `verify_rows(completions, rows)`.
BUILTIN = {
    "numeric": "selfimprove_dagster.verifiers.numeric",
    "multiple_choice": "selfimprove_dagster.verifiers.multiple_choice",
    "math": "selfimprove_dagster.verifiers.math",
    "code": "selfimprove_dagster.verifiers.code",
}

RowVerifier = Callable[[str, Mapping[str, Any]], Verdict]


def verifier_name(row: Mapping[str, Any], verifier: str | None = None) -> str:
    """The verifier that judges `row`: the argument, else its `verifier` column, else numeric."""
    name = verifier or row.get("verifier") or DEFAULT_VERIFIER
    return str(name).strip()


def check_verifier(name: str) -> str:
    """`name` if it names a built-in verifier or a `module:function`, else a SelfImproveError."""
    if name in BUILTIN or _is_custom(name):
        return name
    raise SelfImproveError(
        f"unknown verifier {name!r}",
        f"use one of {', '.join(sorted(BUILTIN))} or 'package.module:function' for your own",
    )


def verify_row(completion: str, row: Mapping[str, Any], verifier: str | None = None) -> Verdict:
    """The verdict on `completion` as an answer to `row` (see the module docstring)."""
    return _row_verifier(verifier_name(row, verifier))(last_message_text(completion), row)


def verify_rows(
    completions: Sequence[str], rows: Sequence[Mapping[str, Any]], verifier: str | None = None
) -> list[Verdict]:
    """One verdict per (completion, row) pair, in order; each verifier's rows in one batch."""
    if len(completions) != len(rows):
        raise SelfImproveError(
            f"verify_rows got {len(completions)} completions but {len(rows)} rows",
            "pass one row (with its reference answer) per completion, in the same order",
        )
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(verifier_name(row, verifier), []).append(i)
    verdicts: list[Verdict | None] = [None] * len(rows)
    for name, indices in groups.items():
        texts = [last_message_text(completions[i]) for i in indices]
        group_rows = [rows[i] for i in indices]
        for i, verdict in zip(indices, _batch_verifier(name)(texts, group_rows), strict=True):
            verdicts[i] = verdict
    return verdicts  # type: ignore[return-value]


# --- helpers ---------------------------------------------------------------------


def _is_custom(name: str) -> bool:
    module, _, function = name.partition(":")
    return bool(module) and bool(function) and " " not in name


def _row_verifier(name: str) -> RowVerifier:
    check_verifier(name)
    if name in BUILTIN:
        return importlib.import_module(BUILTIN[name]).verify_row
    from selfimprove_dagster.verifiers.custom import load_custom

    return load_custom(name)


def _batch_verifier(name: str) -> Callable[[list[str], list[Mapping[str, Any]]], list[Verdict]]:
    check_verifier(name)
    if name in BUILTIN:
        module = importlib.import_module(BUILTIN[name])
        if hasattr(module, "verify_rows"):
            return module.verify_rows
    single = _row_verifier(name)
    return lambda texts, rows: [single(t, r) for t, r in zip(texts, rows, strict=True)]
