"""The verifier for code answers (MBPP, HumanEval, any row with `tests`).

A row carries `tests` (a list of statements, usually asserts, or one string of test
code such as HumanEval's `def check(candidate): ...`), optionally `test_setup` (code
run after the program, in its namespace) and `entry_point` (the function the tests
call). The completion's code is the concatenation of its fenced ```python blocks, or
the whole reply when it has none. When the row names an `entry_point` that the code
does not define, the code in the row's `prompt` (its fenced block, or the whole
prompt) is put in front (HumanEval: the prompt is the signature and docstring, the
completion may be just the body).

The judge (`verifiers.sandbox`) runs the program in a sandbox of its own and decides
the verdict outside it: the candidate's process only answers the tests' calls with
plain data. The verdict says which test failed, or why the run was killed; judged
without a sandbox (`SELFIMPROVE_CODE_SANDBOX=none`, an explicit opt-in), every
verdict's reason says so. `verify_rows` runs the candidates in parallel on all cores.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.verifiers.sandbox import (
    SETTING,
    CandidateJob,
    SandboxLimits,
    SandboxResult,
    run_programs,
    sandbox_kind,
)
from selfimprove_dagster.verifiers.verdict import Verdict

UNSANDBOXED = f"judged without a sandbox ({SETTING}=none)"

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
    """The row's tests as a list of code strings, as the row gives them (HumanEval's
    `check` is called on the entry point by the judge); a row without tests is a
    SelfImproveError."""
    tests = row.get("tests")
    if isinstance(tests, str):
        tests = [tests]
    tests = [str(t) for t in (tests or []) if t is not None and str(t).strip()]
    if not tests:
        raise SelfImproveError(
            "the code verifier got a row without `tests`",
            "give every code row a `tests` list of assert statements (or HumanEval's `test`)",
        )
    return tests


def candidate_job(program: str, row: Mapping[str, Any]) -> CandidateJob:
    """What the judge needs to test `program` against `row`: its tests and setup, the
    entry point, the prompt's own helper code (HumanEval) and the names the row's
    reference solution defines (the task's functions, even where they reuse a
    builtin's name, such as MBPP's `sum`)."""
    entry = str(row.get("entry_point") or "") or None
    helpers, helper_names = "", frozenset()
    if entry:
        prompt = str(row.get("prompt") or "")
        helpers = (extract_code(prompt) if "```" in prompt else prompt) or ""
        helper_names = _defined_names(helpers) - {entry}
    return CandidateJob(
        program=program,
        tests=tuple(row_tests(row)),
        setup=str(row.get("test_setup") or ""),
        entry_point=entry,
        helpers=helpers if helper_names else "",
        helper_names=helper_names,
        task_names=_defined_names(str(row.get("answer") or ""), functions_only=True),
    )


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
        row_tests(row)  # a row without tests is an error whatever the reply
        if program is None:
            verdicts[i] = Verdict(False, None, "no_answer: no code in the reply")
        elif (problem := _syntax_error(program)) is not None:
            verdicts[i] = Verdict(False, program, f"syntax_error: {problem}")
        else:
            jobs.append(candidate_job(program, row))
            where.append(i)
    kind = sandbox_kind() if jobs else None  # no sandbox: refuses, naming the fix
    for i, result in zip(where, run_programs(jobs, limits, workers), strict=True):
        verdicts[i] = _verdict(programs[i], result, kind)
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


def _verdict(program: str | None, result: SandboxResult, kind: str | None) -> Verdict:
    reason = result.describe()
    if kind == "none":
        reason = f"{reason}: {UNSANDBOXED}" if reason == "correct" else f"{reason}; {UNSANDBOXED}"
    return Verdict(correct=result.passed, extracted=program, reason=reason, sandbox=kind)


def _defined_names(code: str, functions_only: bool = False) -> frozenset[str]:
    """Top-level names `code` defines (functions and classes only, if asked); none
    when it does not parse."""
    try:
        body = ast.parse(code).body
    except (SyntaxError, ValueError):
        return frozenset()
    names = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif functions_only:
            continue
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return frozenset(names)


def judge_metadata(rows: Any) -> dict[str, str]:
    """What judged a round's code rows, for its metadata (`code_sandbox`, ...): empty when
    the round has no row the code verifier judges (`rows`: a frame with `verifier`)."""
    from selfimprove_dagster.verifiers.isolation import sandbox_description

    columns = getattr(rows, "columns", [])
    if "verifier" not in columns or "code" not in set(rows["verifier"].to_list()):
        return {}
    return {f"code_{key}": value for key, value in sandbox_description().items()}
