"""Run untrusted candidate programs: one process per candidate, limited and isolated.

    run_program(program, tests, setup)            -> SandboxResult
    run_programs([(program, tests, setup), ...])  -> [SandboxResult]  # parallel on all cores

What contains a candidate (each layer checked by tests/test_sandbox.py):

- a separate process (`python -I -S`: no site-packages, no PYTHON* variables) in a
  fresh temporary directory, deleted afterwards, with an environment of PATH, LANG and
  HOME only (the parent's secrets are not inherited);
- setrlimit: CPU seconds, address space (a 10 GB allocation fails with MemoryError),
  file size, number of processes, no core files;
- as root: the child drops to user `nobody` (root ignores RLIMIT_NPROC, and nobody
  cannot write the parent's files) and runs in a new network namespace (`unshare
  --net`: no interface but a down loopback), when `unshare` works here;
- an audit hook (PEP 578) in the child refuses process creation, sockets, ctypes,
  frame/GC introspection, and writes or file operations outside its directory;
- a wall-clock timeout after which the whole process group is killed (SIGKILL).

The hook is defence in depth, not a security boundary against a determined attacker
(pure-Python code can't be fully sandboxed in-process); the OS layers are what
contain damage. A candidate that forges `result.json` must also know the per-run
nonce, which the runner holds only in its own frame.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

RUNNER = Path(__file__).with_name("sandbox_runner.py")
NOBODY = 65534


@dataclass(frozen=True)
class SandboxLimits:
    """Per-candidate limits (defaults fit MBPP/HumanEval-sized functions)."""

    wall_seconds: float = 5.0  # killed (process group) after this long
    cpu_seconds: int = 4  # RLIMIT_CPU
    memory_bytes: int = 512 * 2**20  # RLIMIT_AS: address space
    file_bytes: int = 8 * 2**20  # RLIMIT_FSIZE: largest file it may write
    processes: int = 32  # RLIMIT_NPROC (for user nobody when run as root)


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one candidate."""

    passed: bool
    status: str  # passed | failed | setup_error | candidate_error | timeout | killed | crashed
    test_index: int | None  # the first failing test (0-based), if a test failed
    test: str | None  # its source
    error: str | None  # exception or signal, in words
    seconds: float

    def describe(self) -> str:
        """One line for a verdict's reason: "test_failed: test 2 `assert ...`: AssertionError"."""
        if self.passed:
            return "correct"
        if self.status == "failed":
            return f"test_failed: test {self.test_index + 1} `{_short(self.test)}`: {self.error}"
        return f"{self.status}: {self.error}"


def run_program(
    program: str, tests: list[str], setup: str = "", limits: SandboxLimits | None = None
) -> SandboxResult:
    """Run `setup`, then `program`, then each test statement in one sandboxed process."""
    limits = limits or SandboxLimits()
    workdir = Path(tempfile.mkdtemp(prefix="selfimprove-sandbox-"))
    started = time.monotonic()
    try:
        nonce = _prepare(workdir, program, tests, setup)
        returncode, timed_out = _execute(workdir, nonce, limits)
        return _result(workdir, nonce, returncode, timed_out, limits, time.monotonic() - started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(
    jobs: list[tuple[str, list[str], str]],
    limits: SandboxLimits | None = None,
    workers: int | None = None,
) -> list[SandboxResult]:
    """`run_program` for each (program, tests, setup), `workers` at a time (default: cores).

    Threads only wait on child processes here, so a thread per worker is enough.
    """
    workers = workers or default_workers()
    if workers == 1 or len(jobs) <= 1:
        return [run_program(p, t, s, limits) for p, t, s in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_program(*job, limits=limits), jobs))


def default_workers() -> int:
    """Cores this process may use (the sandbox's parallelism)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@cache
def network_isolation() -> list[str]:
    """The command prefix that gives a child its own empty network namespace
    (`unshare --net`), or [] where that is not permitted (then sockets are refused by
    the audit hook only)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    try:
        probe = subprocess.run([unshare, "--net", "true"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [unshare, "--net", "--"] if probe.returncode == 0 else []


# --- helpers ---------------------------------------------------------------------


def _prepare(workdir: Path, program: str, tests: list[str], setup: str) -> str:
    (workdir / "sandbox_runner.py").write_text(RUNNER.read_text(encoding="utf-8"), encoding="utf-8")
    job = {"program": program, "tests": list(tests), "setup": setup or ""}
    (workdir / "job.json").write_text(json.dumps(job), encoding="utf-8")
    if os.getuid() == 0:  # the child runs as nobody: it must own its directory
        for path in (workdir, *workdir.iterdir()):
            os.chown(path, NOBODY, NOBODY)
    return secrets.token_hex(16)


def _execute(workdir: Path, nonce: str, limits: SandboxLimits) -> tuple[int | None, bool]:
    command = [
        *network_isolation(),
        sys.executable,
        "-I",
        "-S",
        "sandbox_runner.py",
        str(limits.cpu_seconds),
        str(limits.memory_bytes),
        str(limits.file_bytes),
        str(limits.processes),
    ]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir)}
    process = subprocess.Popen(
        command,
        cwd=workdir,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: one killpg ends it and its children
    )
    try:
        process.communicate(input=(nonce + "\n").encode(), timeout=limits.wall_seconds)
        return process.returncode, False
    except subprocess.TimeoutExpired:
        _kill_group(process)
        return process.returncode, True
    finally:
        _kill_group(process)  # whatever the candidate left behind in its group


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _result(
    workdir: Path,
    nonce: str,
    returncode: int | None,
    timed_out: bool,
    limits: SandboxLimits,
    seconds: float,
) -> SandboxResult:
    if timed_out:
        return SandboxResult(
            False, "timeout", None, None, f"killed after {limits.wall_seconds:g} s", seconds
        )
    report = _read_report(workdir / "result.json", nonce)
    if report is None:
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name
            why = " (CPU time limit)" if name == "SIGXCPU" else ""
            return SandboxResult(False, "killed", None, None, f"{name}{why}", seconds)
        why = f"exit code {returncode} before the tests finished (no result from the runner)"
        return SandboxResult(False, "crashed", None, None, why, seconds)
    status = str(report.get("status"))
    return SandboxResult(
        passed=status == "passed",
        status=status,
        test_index=report.get("test_index"),
        test=report.get("test"),
        error=report.get("error"),
        seconds=seconds,
    )


def _read_report(path: Path, nonce: str) -> dict | None:
    try:
        if path.is_symlink() or path.stat().st_size > 1_000_000:
            return None
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("nonce") == nonce else None


def _short(text: str | None, limit: int = 80) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
