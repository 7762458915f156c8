"""Dataset records of every shape -> problem rows (the parsing; no file I/O).

A record (one line of a user's .jsonl, one row of a .parquet) becomes a problem row
with `prompt`, `answer`, `verifier` and, where the verifier needs them, `choices`
(multiple choice: a JSON object label -> text), `tests` / `test_setup` /
`entry_point` (code). Shapes recognized, by their columns:

    prompt + answer                              numeric (or the `verifier` column/setting)
    question + answer "... #### N"               GSM8K, numeric
    prompt|question + choices + answer           multiple choice (CommonsenseQA: answer "B")
    problem + answer (+ solution)                MATH, math
    text + test_list (+ test_setup_code, code)   MBPP, code
    prompt + test + entry_point                  HumanEval, code

The verifier of a row is its `verifier` column, else the `verifier` setting, else the
one its shape implies. A bad record is a SelfImproveError naming its row.

    parse_record({"question": "...", "answer": "... #### 42"}, "gsm8k.jsonl row 1")
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.verifiers.dispatch import check_verifier
from selfimprove_dagster.verifiers.numeric import normalize_number

# What a code prompt asks for, after the task text and its tests (MBPP's own wording).
CODE_INSTRUCTION = "Your code should pass these tests:"
# What a HumanEval prompt asks for, above its fenced signature and docstring.
HUMANEVAL_INSTRUCTION = "Complete the Python function below."


def parse_record(
    record: Mapping[str, Any], where: str, verifier: str | None = None
) -> dict[str, Any]:
    """One problem row (prompt, answer, verifier, choices, tests, test_setup,
    entry_point) from a record of any shape above; `where` names it in errors."""
    shape = record_shape(record)
    if shape is None:
        # Report what is missing from the plain layout the record seems closest to.
        closest = ("question", "answer") if "question" in record else ("prompt", "answer")
        missing = ", ".join(f"`{c}`" for c in closest if c not in record)
        raise SelfImproveError(
            f"{where} is missing column(s) {missing} (found {_names(record)}); expected "
            "`prompt` and `answer`, or GSM8K's `question` and `answer` with '#### N'",
            "rename the columns or add the missing ones (other layouts: `choices` for multiple "
            "choice, MATH's `problem`, MBPP's `text` + `test_list`, HumanEval's `prompt` + "
            "`test` + `entry_point`)",
        )
    chosen = record.get("verifier") or verifier or SHAPE_VERIFIER[shape]
    name = check_verifier(str(chosen).strip())
    row = _BUILDERS[shape](record, where)
    row["verifier"] = name
    row["answer"] = _checked_answer(row, where)
    return row


# The verifier a shape implies when neither the row nor the setting names one.
SHAPE_VERIFIER = {
    "plain": "numeric",
    "gsm8k": "numeric",
    "choices": "multiple_choice",
    "math": "math",
    "mbpp": "code",
    "humaneval": "code",
}


def record_shape(record: Mapping[str, Any]) -> str | None:
    """Which layout a record has (a key of SHAPE_VERIFIER), or None."""
    keys = set(record)
    if {"test", "entry_point", "prompt"} <= keys:
        return "humaneval"
    if {"text", "test_list"} <= keys:
        return "mbpp"
    if "choices" in keys and ({"prompt", "question"} & keys) and "answer" in keys:
        return "choices"
    if {"problem", "answer"} <= keys:
        return "math"
    if {"prompt", "answer"} <= keys:
        return "plain"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    return None


# --- shape builders ------------------------------------------------------------------


def _plain(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    return _row(_text(record, "prompt", where), record.get("answer"))


def _gsm8k(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    return _row(_text(record, "question", where), record.get("answer"))


def _choices(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    column = "prompt" if "prompt" in record else "question"
    text = _text(record, column, where)
    choices = _choice_dict(record.get("choices"), where)
    if not all(re.search(rf"(?m)^\(?{label}[.)]", text) for label in choices):
        text = text + "\n" + "\n".join(f"{label}. {option}" for label, option in choices.items())
    return _row(text, record.get("answer"), choices=json.dumps(choices, ensure_ascii=False))


def _math(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    return _row(_text(record, "problem", where), record.get("answer"))


def _mbpp(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    tests = [str(t) for t in (record.get("test_list") or [])]
    if not tests:
        raise SelfImproveError(f"{where} has an empty `test_list`", "give at least one assert")
    text = _text(record, "text", where)
    prompt = f"{text}\n{CODE_INSTRUCTION}\n" + "\n".join(tests)
    return _row(
        prompt,
        str(record.get("code") or "").replace("\r\n", "\n"),
        tests=tests,
        test_setup=str(record.get("test_setup_code") or ""),
    )


def _humaneval(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    test = record.get("test")
    if not isinstance(test, str) or not test.strip():
        raise SelfImproveError(f"{where} has no `test` code", "give HumanEval's `check` function")
    code = str(record.get("prompt") or "")
    if not code.strip():
        raise SelfImproveError(f"{where} has no `prompt` code", "give HumanEval's `prompt`")
    return _row(
        f"{HUMANEVAL_INSTRUCTION}\n```python\n{code.rstrip()}\n```",
        str(record.get("canonical_solution") or ""),
        tests=[test],
        entry_point=str(record["entry_point"]),
    )


_BUILDERS = {
    "plain": _plain,
    "gsm8k": _gsm8k,
    "choices": _choices,
    "math": _math,
    "mbpp": _mbpp,
    "humaneval": _humaneval,
}


# --- helpers -------------------------------------------------------------------------


def _row(prompt: str, answer: object, **extra: Any) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "answer": answer,
        "choices": extra.get("choices"),
        "tests": extra.get("tests"),
        "test_setup": extra.get("test_setup"),
        "entry_point": extra.get("entry_point"),
    }


def _checked_answer(row: dict[str, Any], where: str) -> str:
    """The reference answer as the row's verifier reads it, or a SelfImproveError."""
    answer, verifier = row["answer"], row["verifier"]
    if verifier == "numeric":
        value = _numeric(answer)
        if value is None:
            raise SelfImproveError(
                f"{where} has an answer that is not a number: {answer!r}",
                "make `answer` a number (e.g. 42, '1,234', '3.5') or end it with '#### N', "
                "or name its verifier (a `verifier` column or the `verifier` setting)",
            )
        return value
    if verifier == "multiple_choice":
        from selfimprove_dagster.verifiers.multiple_choice import choice_map, reference_label

        if row["choices"] is None:
            raise SelfImproveError(f"{where} is multiple choice but has no `choices`", "add them")
        return reference_label(answer, choice_map(json.loads(row["choices"])))
    if verifier == "code":
        if not row["tests"]:
            raise SelfImproveError(
                f"{where} uses the code verifier but has no tests",
                "give `tests` (assert statements), MBPP's `test_list` or HumanEval's `test`",
            )
        return "" if answer is None else str(answer)
    if answer is None or not str(answer).strip():
        raise SelfImproveError(f"{where} has no `answer`", "give every row its reference answer")
    return str(answer).strip()


def _numeric(value: object) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return normalize_number(value)
    if not isinstance(value, str):
        return None
    # GSM8K solutions put the final number after "####"; the reasoning before it is ignored.
    return normalize_number(value.rsplit("####", 1)[-1])


def _text(record: Mapping[str, Any], column: str, where: str) -> str:
    value = record.get(column)
    if not isinstance(value, str) or not value.strip():
        raise SelfImproveError(
            f"{where} has no `{column}` text (got {value!r})",
            f"give every row a non-empty `{column}` string",
        )
    return value.strip()


def _choice_dict(choices: object, where: str) -> dict[str, str]:
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            choices = None
    if isinstance(choices, Mapping):
        mapped = {str(k).strip().upper(): str(v) for k, v in choices.items() if v is not None}
    elif isinstance(choices, list | tuple) and all(isinstance(c, Mapping) for c in choices):
        mapped = {str(c.get("label")).upper(): str(c.get("text")) for c in choices}
    elif isinstance(choices, list | tuple):
        mapped = {string.ascii_uppercase[i]: str(c) for i, c in enumerate(choices)}
    else:
        mapped = {}
    if len(mapped) < 2:
        raise SelfImproveError(
            f"{where} has `choices` {choices!r}: fewer than two options",
            'give `choices` as {"A": "text", ...}, a list of texts, or [{"label", "text"}]',
        )
    return mapped


def _names(record: Mapping[str, Any]) -> str:
    return ", ".join(f"`{c}`" for c in record) or "none"
