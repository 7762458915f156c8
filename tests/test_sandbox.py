"""The code sandbox against hostile completions: real child processes, real limits.

Each hostile program must be contained, judged wrong with a reason, and finish within
a few seconds (tight limits below), leaving nothing behind: no file outside its
directory, no surviving process, no secret read.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfimprove_dagster.verifiers import code
from selfimprove_dagster.verifiers.sandbox import (
    SandboxLimits,
    network_isolation,
    run_program,
    run_programs,
)

# Tight limits: every hostile case ends in about two seconds at most.
FAST = SandboxLimits(wall_seconds=2.0, cpu_seconds=1, memory_bytes=256 * 2**20)
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def _run(program: str, tests: list[str] | None = None):
    started = time.monotonic()
    result = run_program(program, tests or ["pass  # no tests: only run the program"], limits=FAST)
    assert time.monotonic() - started < 5, "a hostile candidate held the verifier up"
    return result


def test_correct_program_passes():
    assert _run(ADD, ADD_TESTS).passed


def test_failing_test_is_named():
    result = _run("def add(a, b):\n    return a - b\n", ADD_TESTS)
    assert not result.passed
    assert result.test_index == 0
    assert result.describe().startswith(
        "test_failed: test 1 `assert add(1, 2) == 3`: AssertionError"
    )


def test_infinite_loop_is_killed():
    result = _run("while True:\n    pass\n")
    assert not result.passed
    assert result.status in ("killed", "timeout")  # SIGXCPU at 1 CPU-second, or the wall clock


def test_sleeping_program_times_out_and_its_group_is_killed(tmp_path: Path):
    marker = tmp_path / "alive"
    result = _run("import time\ntime.sleep(60)\n")
    assert result.status == "timeout"
    assert "killed after 2 s" in result.describe()
    assert not marker.exists()


def test_fork_bomb_is_refused():
    before = _process_count()
    result = _run("import os\nwhile True:\n    os.fork()\n")
    assert not result.passed
    assert "fork" in (result.error or "")
    assert _process_count() <= before + 2  # nothing left running


def test_10_gb_allocation_fails_with_memory_error():
    result = _run("x = bytearray(10 * 2**30)\n")
    assert result.status == "candidate_error"
    assert result.error.startswith("MemoryError")


def test_writing_outside_the_working_directory_is_refused(tmp_path: Path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)  # even where the child's user could write, the hook refuses
    result = _run(f"open({str(target)!r}, 'w').write('x')\n")
    assert not result.passed
    assert "outside the working directory" in (result.error or "")
    assert not target.exists()


def test_writing_inside_the_working_directory_is_allowed():
    program = (
        "open('scratch.txt', 'w').write('ok')\ndef f():\n    return open('scratch.txt').read()\n"
    )
    assert _run(program, ["assert f() == 'ok'"]).passed


def test_network_socket_is_refused():
    result = _run("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))\n")
    assert not result.passed
    assert result.status == "candidate_error"


def test_network_namespace_has_no_route_to_the_parent():
    """The OS layer alone (no audit hook): a child under `network_isolation()` cannot reach
    a server listening on the parent's loopback."""
    prefix = network_isolation()
    if not prefix:
        pytest.skip("unshare --net is not permitted here (the audit hook still refuses sockets)")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        probe = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"
        child = subprocess.run(
            [*prefix, sys.executable, "-c", probe], capture_output=True, timeout=10
        )
    assert child.returncode != 0
    assert b"Errno" in child.stderr or b"Error" in child.stderr


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("SELFIMPROVE_TEST_SECRET", "hunter2")
    program = "import os\nSECRET = os.environ.get('SELFIMPROVE_TEST_SECRET')\n"
    result = _run(program, ["assert SECRET == 'hunter2'"])
    assert not result.passed
    assert result.status == "failed"


def test_forged_result_file_is_not_trusted():
    program = (
        "import json, os\njson.dump({'status': 'passed'}, open('result.json', 'w'))\nos._exit(0)\n"
    )
    result = _run(program, ["assert False"])
    assert not result.passed
    assert result.status == "crashed"


def test_subprocess_is_refused():
    result = _run("import subprocess\nsubprocess.run(['sleep', '60'])\n")
    assert not result.passed


def test_candidates_run_in_parallel_and_in_order():
    jobs = [
        (ADD if i % 2 == 0 else "def add(a, b):\n    return 0\n", ADD_TESTS, "") for i in range(6)
    ]
    results = run_programs(jobs, limits=FAST, workers=2)
    assert [r.passed for r in results] == [True, False] * 3


def test_code_verifier_reads_fences_setup_and_humaneval_prompts():
    mbpp = {"answer": "", "tests": ["assert add(2, 2) == 4"], "test_setup": "import math"}
    reply = f"Here you go:\n```python\n{ADD}```\nDone."
    assert code.verify_row(reply, mbpp, FAST).correct
    humaneval = {
        "prompt": 'def add(a, b):\n    """Sum."""\n',
        "tests": ["def check(candidate):\n    assert candidate(1, 2) == 3\n"],
        "entry_point": "add",
        "answer": "",
    }
    assert code.verify_row("    return a + b\n", humaneval, FAST).correct
    verdict = code.verify_row("    return a * b\n", humaneval, FAST)
    assert not verdict.correct and verdict.reason.startswith("test_failed")


def test_code_verdicts_for_no_code_and_syntax_errors():
    row = {"answer": "", "tests": ["assert f() == 1"]}
    assert code.verify_row("", row, FAST).reason.startswith("no_answer")
    assert code.verify_row("def f(:\n", row, FAST).reason.startswith("syntax_error")


def _process_count() -> int:
    return sum(1 for entry in os.listdir("/proc") if entry.isdigit())
