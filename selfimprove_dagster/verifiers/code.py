"""The verifier for code answers (MBPP, HumanEval, any row with `tests`).

A row carries `tests` (a list of statements, usually asserts, or one string of test
code), optionally `test_setup` (code run first) and `entry_point` (the function the
tests call). The completion's code is the concatenation of its fenced ```python
blocks, or the whole reply when it has none. When the row names an `entry_point`
that the code does not define, the code in the row's `prompt` (its fenced block, or
the whole prompt) is put in front (HumanEval: the prompt is the signature and
docstring, the completion may be just the body).

The program runs against each test in the sandbox (`verifiers.sandbox`); the verdict
says which test failed, or why the run was killed. `verify_rows` runs the candidates
in parallel on all cores.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.verifiers.sandbox import SandboxLimits, SandboxResult, run_programs
from selfimprove_dagster.verifiers.verdict import Verdict

_FENCE_RE = re.compile(
    r"```[ \t]*(?:python|py|python3)?[ \t]*\n(?P<code>.*?)(?:```|\Z)", re.S | re.I
)


def extract_code(completion: str) -> str | None:
    """The code in a reply: its fenced blocks joined, else the whole reply; None if empty."""
    blocks = [m.group("code") for m in _FENCE_RE.finditer(completion)]
    code = "\n".join(blocks) if blocks else completion
    code = code.strip("\n")
    return code if code.strip() else None


def program_for(completion: str, row: Mapping[str, Any]) -> str | None:
    """The program to test: the reply's code, after the row's prompt when the reply
    only continues it (a HumanEval body without its `def` line)."""
    code = extract_code(completion)
    if code is None:
        return None
    entry = row.get("entry_point")
    defines = re.compile(rf"\bdef\s+{re.escape(str(entry))}\s*\(") if entry else None
    if defines is not None and not defines.search(code):
        prompt = str(row.get("prompt") or "")
        prefix = extract_code(prompt) if "```" in prompt else prompt  # the fenced signature
        if prefix and defines.search(prefix):
            return prefix.rstrip("\n") + "\n" + code
    return code


def row_tests(row: Mapping[str, Any]) -> list[str]:
    """The row's tests as a list of code strings (HumanEval's `check` is called on the
    entry point); a row without tests is a SelfImproveError."""
    tests = row.get("tests")
    if isinstance(tests, str):
        tests = [tests]
    tests = [str(t) for t in (tests or []) if t is not None and str(t).strip()]
    if not tests:
        raise SelfImproveError(
            "the code verifier got a row without `tests`",
            "give every code row a `tests` list of assert statements (or HumanEval's `test`)",
        )
    entry = row.get("entry_point")
    if entry and len(tests) == 1 and re.search(r"\bdef\s+check\s*\(", tests[0]):
        tests = [tests[0] + f"\n\ncheck({entry})\n"]
    return tests


def verify_row(
    completion: str, row: Mapping[str, Any], limits: SandboxLimits | None = None
) -> Verdict:
    """Whether the reply's program passes all of the row's tests."""
    return verify_rows([completion], [row], limits)[0]


def verify_rows(
    completions: list[str],
    rows: list[Mapping[str, Any]],
    limits: SandboxLimits | None = None,
    workers: int | None = None,
) -> list[Verdict]:
    """Verdicts for many candidates; programs run `workers` at a time (default: cores)."""
    programs = [program_for(c, r) for c, r in zip(completions, rows, strict=True)]
    verdicts: list[Verdict | None] = [None] * len(rows)
    jobs, where = [], []
    for i, (program, row) in enumerate(zip(programs, rows, strict=True)):
        tests = row_tests(row)
        if program is None:
            verdicts[i] = Verdict(False, None, "no_answer: no code in the reply")
        elif (problem := _syntax_error(program)) is not None:
            verdicts[i] = Verdict(False, program, f"syntax_error: {problem}")
        else:
            jobs.append((program, tests, str(row.get("test_setup") or "")))
            where.append(i)
    for i, result in zip(where, run_programs(jobs, limits, workers), strict=True):
        verdicts[i] = _verdict(programs[i], result)
    return verdicts  # type: ignore[return-value]


# --- helpers ---------------------------------------------------------------------


def _syntax_error(program: str) -> str | None:
    try:
        ast.parse(program)
    except SyntaxError as err:
        return f"line {err.lineno}: {err.msg}"
    except ValueError as err:  # null bytes
        return str(err)
    return None


def _verdict(program: str | None, result: SandboxResult) -> Verdict:
    return Verdict(correct=result.passed, extracted=program, reason=result.describe())
