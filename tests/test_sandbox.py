"""The code judge against hostile completions: real sandboxes, real limits.

Each hostile program must be contained, judged wrong with a reason, and finish within
a few seconds (tight limits below), leaving nothing behind: no file outside its
directory, no surviving process, no secret read. The attack classes of issue 24 are
in tests/test_sandbox_redteam.py; the splitting of tests in tests/test_code_judge.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from selfimprove_dagster.verifiers import code, isolation
from selfimprove_dagster.verifiers.sandbox import SandboxLimits, run_program, run_programs

# Tight limits: every hostile case ends in about two seconds at most.
FAST = SandboxLimits(wall_seconds=2.0, cpu_seconds=1, memory_bytes=256 * 2**20)
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
RUNNER_MARK = "The sandboxed side of the code judge"  # in every sandboxed command line


def _run(program: str, tests: list[str] | None = None):
    started = time.monotonic()
    result = run_program(program, tests or ["pass  # no tests: only run the program"], limits=FAST)
    assert time.monotonic() - started < 5, "a hostile candidate held the verifier up"
    return result


def sandboxed_processes() -> list[int]:
    """Processes on this machine running a sandbox this test process started."""
    alive, judge = [], f"# judge {os.getpid()}\n".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
                if RUNNER_MARK.encode() in command and judge in command:
                    alive.append(int(entry))
            except OSError:
                pass
    return alive


def test_correct_program_passes():
    assert _run(ADD, ADD_TESTS).passed


def test_failing_test_is_named():
    result = _run("def add(a, b):\n    return a - b\n", ADD_TESTS)
    assert not result.passed
    assert result.test_index == 0
    assert result.describe() == "test_failed: test 1 `assert add(1, 2) == 3`: AssertionError"


def test_exceptions_of_the_candidate_are_named():
    result = _run("def add(a, b):\n    raise ValueError('no')\n", ADD_TESTS)
    assert result.describe() == "test_failed: test 1 `assert add(1, 2) == 3`: ValueError: no"


def test_infinite_loop_is_killed():
    result = _run("while True:\n    pass\n")
    assert not result.passed
    assert result.status in ("killed", "timeout")  # SIGXCPU at 1 CPU-second, or the wall clock


def test_sleeping_program_times_out_and_nothing_survives():
    result = _run("import time\ntime.sleep(60)\n")
    assert result.status == "timeout"
    assert "killed after 2 s" in result.describe()
    assert sandboxed_processes() == []


def test_fork_bomb_is_refused():
    result = _run("import os\nwhile True:\n    os.fork()\n")
    assert not result.passed
    assert result.status == "candidate_error"
    assert "Operation not permitted" in (result.error or "")  # the system-call filter
    assert sandboxed_processes() == []  # nothing left running


def test_threads_still_work():
    program = (
        "import threading\nout = []\nt = threading.Thread(target=lambda: out.append(1))\n"
        "t.start()\nt.join()\ndef f():\n    return out\n"
    )
    assert _run(program, ["assert f() == [1]"]).passed


def test_10_gb_allocation_fails_with_memory_error():
    result = _run("x = bytearray(10 * 2**30)\n")
    assert result.status == "candidate_error"
    assert result.error.startswith("MemoryError")


def test_writing_inside_the_working_directory_is_allowed():
    program = (
        "open('scratch.txt', 'w').write('ok')\ndef f():\n    return open('scratch.txt').read()\n"
    )
    assert _run(program, ["assert f() == 'ok'"]).passed


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("SELFIMPROVE_TEST_SECRET", "hunter2")
    program = "import os\ndef secret():\n    return os.environ.get('SELFIMPROVE_TEST_SECRET')\n"
    result = _run(program, ["assert secret() == 'hunter2'"])
    assert not result.passed
    assert result.status == "failed"


def test_prints_and_input_do_not_disturb_the_judge():
    program = "import sys\nprint('x' * 100_000)\nsys.stderr.write('y' * 100_000)\n"
    program += "def add(a, b):\n    print({'ok': 3})\n    return a + b\nNAME = input()\n"
    assert not _run(program, ADD_TESTS).passed  # input() finds no data: EOFError
    assert _run(program.replace("NAME = input()\n", ""), ADD_TESTS).passed


def test_candidates_run_in_parallel_and_in_order():
    jobs = [
        (ADD if i % 2 == 0 else "def add(a, b):\n    return 0\n", ADD_TESTS, "") for i in range(6)
    ]
    results = run_programs(jobs, limits=FAST, workers=2)
    assert [r.passed for r in results] == [True, False] * 3


def test_code_verifier_reads_fences_setup_and_humaneval_prompts():
    mbpp = {"answer": "", "tests": ["assert add(2, 2) == 4"], "test_setup": "import math"}
    reply = f"Here you go:\n```python\n{ADD}```\nDone."
    verdict = code.verify_row(reply, mbpp, FAST)
    assert verdict.correct and verdict.sandbox == "bubblewrap"
    humaneval = {
        "prompt": 'def add(a, b):\n    """Sum."""\n',
        "tests": ["def check(candidate):\n    assert candidate(1, 2) == 3\n"],
        "entry_point": "add",
        "answer": "",
    }
    assert code.verify_row("    return a + b\n", humaneval, FAST).correct
    verdict = code.verify_row("    return a * b\n", humaneval, FAST)
    assert verdict.reason == "test_failed: test 1 `assert candidate(1, 2) == 3`: AssertionError"


def test_code_verdicts_for_no_code_and_syntax_errors():
    row = {"answer": "", "tests": ["assert f() == 1"]}
    assert code.verify_row("", row, FAST).reason.startswith("no_answer")
    assert code.verify_row("def f(:\n", row, FAST).reason.startswith("syntax_error")


def test_the_sandbox_sees_only_the_interpreter_and_its_work_dir():
    program = (
        "import os\n"
        "def top():\n    return sorted(os.listdir('/'))\n"
        "def work():\n    return (os.getcwd(), os.listdir('.'))\n"
        "def who():\n    pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "    return (os.getuid(), os.getgid(), len(pids))\n"
    )
    tests = [
        "assert set(top()) <= {'dev', 'lib', 'lib64', 'proc', 'root', 'usr', 'work', 'opt'}",
        "assert work() == ('/work', [])",
        "assert who() == (65534, 65534, 2)",  # its pid 1 and itself: no judge, no sibling
    ]
    if not isolation.interpreter().executable.startswith("/root/"):
        tests[0] = "assert 'work' in top()"  # the interpreter may live anywhere else
    result = _run(program, tests)
    assert result.passed, result.describe()


@pytest.fixture(autouse=True)
def _no_sandbox_outlives_a_test():
    yield
    assert sandboxed_processes() == []
