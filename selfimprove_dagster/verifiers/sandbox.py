"""Judge untrusted candidate programs: the verdict is decided outside the candidate's reach.

    run_program(program, tests, setup, limits, entry_point=..., ...) -> SandboxResult
    run_programs([CandidateJob | (program, tests, setup), ...])      -> [SandboxResult]
    sandbox_kind() / sandbox_description()                           # what isolates them

One candidate, start to verdict:

    tests --plan_tests--> split tests (the judge's comparisons + call sites)
                          | tests it cannot split (ProcessTest)
    candidate process   (fresh sandbox) <- {"program", "setup"} on stdin
                                        <- per call site: its source (+ data arguments)
                                        -> plain data, or the exception in words
    the judge           evaluates each comparison with its own builtins: the verdict
    tests process       (second fresh sandbox, only for tests it cannot split) runs the
                        test with proxies; the judge relays plain data between the two

The candidate's process gets its program, `test_setup` and the calls; never a
comparison, an expected value or a file of the judge's. Its replies are decoded
strictly (`sandbox_runner.decode`): anything but plain data makes the test fail as
`unserializable_result`. Both processes are killed (with everything they started) as
soon as the verdict is known, or after `wall_seconds`. Isolation: `verifiers/isolation.py`.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from selfimprove_dagster.verifiers import sandbox_runner as wire
from selfimprove_dagster.verifiers.isolation import (  # noqa: F401 (re-exported)
    SANDBOX_ID,
    SETTING,
    launch,
    sandbox_description,
    sandbox_kind,
)
from selfimprove_dagster.verifiers.test_split import (
    ARGS,
    CallSite,
    CandidateRaised,
    NeedsProcess,
    ProcessTest,
    SplitTest,
    TestFailed,
    UnserializableResult,
    plan_tests,
    run_split,
)

RUNNER_SOURCE = Path(wire.__file__).read_text(encoding="utf-8")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-candidate limits (defaults fit MBPP/HumanEval-sized functions)."""

    wall_seconds: float = 5.0  # both processes killed after this long
    cpu_seconds: int = 4  # RLIMIT_CPU (SIGXCPU)
    memory_bytes: int = 512 * 2**20  # RLIMIT_AS: address space
    file_bytes: int = 8 * 2**20  # RLIMIT_FSIZE: largest file it may write
    processes: int = 32  # RLIMIT_NPROC (new processes are refused by the filter anyway)


@dataclass(frozen=True)
class CandidateJob:
    """One candidate program and what to test it with."""

    program: str
    tests: tuple[str, ...]
    setup: str = ""  # run after the program, in its namespace (MBPP's test_setup_code)
    entry_point: str | None = None  # HumanEval: what `check(candidate)` is called with
    helpers: str = ""  # the row's own code that tests may call (HumanEval prompt helpers)
    helper_names: frozenset[str] = frozenset()  # names `helpers` defines
    task_names: frozenset[str] = frozenset()  # names the reference solution defines


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one candidate."""

    passed: bool
    # passed | failed | unserializable_result | setup_error | candidate_error | timeout
    # | killed | crashed
    status: str
    test_index: int | None  # the first failing test (0-based), if a test failed
    test: str | None  # the failing statement as written
    error: str | None  # exception or signal, in words
    seconds: float

    def describe(self) -> str:
        """One line for a verdict's reason: "test_failed: test 2 `assert ...`: AssertionError"."""
        if self.passed:
            return "correct"
        if self.status in ("failed", "unserializable_result") and self.test_index is not None:
            word = "test_failed" if self.status == "failed" else self.status
            return f"{word}: test {self.test_index + 1} `{_short(self.test)}`: {self.error}"
        return f"{self.status}: {self.error}"


def run_program(
    program: str,
    tests: Sequence[str],
    setup: str = "",
    limits: SandboxLimits | None = None,
    **job: Any,
) -> SandboxResult:
    """Judge one program against its tests (keywords: the other CandidateJob fields)."""
    return judge(CandidateJob(program, tuple(tests), setup or "", **job), limits)


def run_programs(
    jobs: Sequence[CandidateJob | tuple[str, Sequence[str], str]],
    limits: SandboxLimits | None = None,
    workers: int | None = None,
) -> list[SandboxResult]:
    """Verdicts for many candidates, `workers` at a time (default: the cores). Threads
    only wait on pipes and child processes here, so a thread per worker is enough."""
    jobs = [
        j if isinstance(j, CandidateJob) else CandidateJob(j[0], tuple(j[1]), j[2]) for j in jobs
    ]
    if jobs:
        sandbox_kind()  # no sandbox: refuse before starting anything
    workers = workers or default_workers()
    if workers == 1 or len(jobs) <= 1:
        return [judge(job, limits) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: judge(job, limits), jobs))


def default_workers() -> int:
    """Cores this process may use (the judge's parallelism)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def judge(job: CandidateJob, limits: SandboxLimits | None = None) -> SandboxResult:
    """The verdict on one candidate (see the module docstring)."""
    limits = limits or SandboxLimits()
    started = time.monotonic()
    deadline = started + limits.wall_seconds
    plans = _plans(job.tests, job.entry_point, job.helper_names, job.task_names)
    session = _Session(job, plans, limits, deadline)
    try:
        status, index, statement, error = session.run()
    except _Timeout:
        status, index, statement = "timeout", None, None
        error = f"killed after {limits.wall_seconds:g} s"
    except _Closed as closed:
        index, statement = None, None
        status, error = _ended(closed.process, closed.who)
    except wire.WireError as err:
        status, index, statement = "crashed", None, None
        error = f"a sandboxed process broke the protocol ({err})"
    finally:
        session.close()
    seconds = time.monotonic() - started
    return SandboxResult(status == "passed", status, index, statement, error, seconds)


# --- one candidate ---------------------------------------------------------------


class _Session:
    """The candidate's process, the tests process (started only when needed), and the
    judge's side of the conversation."""

    def __init__(self, job: CandidateJob, plans: list, limits: SandboxLimits, deadline: float):
        self.job, self.plans, self.deadline = job, plans, deadline
        self.limits = {
            "cpu_seconds": limits.cpu_seconds,
            "memory_bytes": limits.memory_bytes,
            "file_bytes": limits.file_bytes,
            "processes": limits.processes,
        }
        # As root the runner itself drops to the sandbox's uid (isolation._launch_bwrap).
        root_sandbox = sandbox_kind() == "bubblewrap" and os.getuid() == 0
        self.drop_to = int(SANDBOX_ID) if root_sandbox else None
        self.candidate: _Channel | None = None
        self.tests: _Channel | None = None

    def run(self) -> tuple[str, int | None, str | None, str | None]:
        self.candidate = _Channel(launch(_runner()), self.deadline, "candidate")
        job = {"program": self.job.program, "setup": self.job.setup}
        self.candidate.send(
            {"mode": "candidate", **job, "limits": self.limits, "drop_to": self.drop_to}
        )
        ready = self.candidate.receive()
        if "failed" in ready and ready["failed"] in ("candidate_error", "setup_error"):
            return ready["failed"], None, None, str(ready.get("error"))[:400]
        if ready != {"ready": True}:
            raise wire.WireError("no ready message")
        for index, plan in enumerate(self.plans):
            if isinstance(plan, SplitTest):
                try:
                    run_split(plan, lambda k, args, plan=plan: self._call(plan.calls[k], args))
                    continue
                except NeedsProcess:
                    plan = plan.fallback
                except TestFailed as failed:
                    return failed.status, index, failed.statement, failed.error
            error, statement = self._run_in_tests_process(index, plan)
            if error is not None:
                unserializable = error.startswith(UnserializableResult.__name__)
                status = "unserializable_result" if unserializable else "failed"
                error = f"returned {error.partition(': ')[2]}" if unserializable else error
                return status, index, statement, error
        return "passed", None, None, None

    def _call(self, site: CallSite, args: list[Any]) -> Any:
        expr = site.template
        try:
            data = wire.encode(args)
        except wire.Unserializable:
            if site.as_written is None:
                raise NeedsProcess from None
            expr, data = site.as_written, []  # `f(int)`: an argument only code can pass
        reply = self._ask(expr, data, site.discard)
        if "ok" in reply:
            try:
                return wire.decode(reply["ok"])
            except wire.WireError as err:
                raise UnserializableResult(f"a malformed value ({err})") from None
        if "unserializable" in reply:
            raise UnserializableResult(str(reply["unserializable"])[:100])
        raise CandidateRaised(str(reply["raised"])[:400])

    def _ask(self, expr: str, data: Any, discard: bool = False) -> dict:
        """One call in the candidate's process; its reply, checked for shape."""
        self.candidate.send({"expr": expr, "args": data, "discard": discard})
        reply = self.candidate.receive()
        if len(reply) != 1 or not ({"ok", "raised", "unserializable"} & reply.keys()):
            raise wire.WireError("an unexpected reply")
        if "ok" not in reply and not isinstance(next(iter(reply.values())), str):
            raise wire.WireError("an unexpected reply")
        return reply

    def _run_in_tests_process(self, index: int, plan: ProcessTest) -> tuple[str | None, str]:
        if self.tests is None:
            self.tests = _Channel(launch(_runner()), self.deadline, "tests")
            tests = [p.fallback if isinstance(p, SplitTest) else p for p in self.plans]
            runnable = [
                {"source": t.source, "proxies": t.proxies, "modules": t.modules} for t in tests
            ]
            self.tests.send(
                {
                    "mode": "tests",
                    "helpers": self.job.helpers,
                    "tests": runnable,
                    "limits": self.limits,
                    "drop_to": self.drop_to,
                }
            )
        self.tests.send({"run": index})
        while True:
            message = self.tests.receive()
            if "done" in message:
                line = message.get("line")
                lines = plan.source.splitlines()
                shown = (
                    lines[line - 1].strip()
                    if isinstance(line, int) and 0 < line <= len(lines)
                    else plan.shown
                )
                error = message.get("error")
                return (None if error is None else str(error)[:400]), shown
            name = message.get("call")
            if name not in plan.proxies:
                raise wire.WireError(f"the tests process called {name!r}")
            args, kwargs = wire.decode(message.get("args")), wire.decode(message.get("kwargs"))
            if type(args) is not list or type(kwargs) is not dict:
                raise wire.WireError("the tests process sent bad arguments")
            reply = self._ask(f"{name}(*{ARGS}[0], **{ARGS}[1])", wire.encode([args, kwargs]))
            if "ok" in reply:  # re-encoded by the judge: only plain data reaches the tests
                try:
                    reply = {"ok": wire.encode(wire.decode(reply["ok"]))}
                except (wire.WireError, wire.Unserializable) as err:
                    reply = {"unserializable": f"a malformed value ({err})"}
            self.tests.send(reply)

    def close(self) -> None:
        for channel in (self.candidate, self.tests):
            if channel is not None:
                channel.close()


class _Timeout(BaseException):
    """The wall clock ran out (a BaseException: passes through a test's `except`)."""


class _Closed(BaseException):
    """A sandboxed process ended its output before answering."""

    def __init__(self, process: subprocess.Popen, who: str):
        super().__init__(who)
        self.process, self.who = process, who


class _Channel:
    """Frames to and from one sandboxed process, every wait bounded by the deadline."""

    def __init__(self, process: subprocess.Popen, deadline: float, who: str):
        self.process, self.deadline, self.who = process, deadline, who
        self._in, self._out = process.stdin.fileno(), process.stdout.fileno()
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)
        self._buffer = bytearray()

    def send(self, message: dict) -> None:
        view = memoryview(wire.frame(message))
        while view:
            self._wait(self._in, select.POLLOUT)
            try:
                view = view[os.write(self._in, view) :]
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise _Closed(self.process, self.who) from None

    def receive(self) -> dict:
        buffer = self._buffer
        while True:
            if len(buffer) >= 4:
                size = int.from_bytes(buffer[:4], "big")
                if size > wire.MAX_FRAME:
                    raise wire.WireError(f"a frame of {size} bytes")
                if len(buffer) >= 4 + size:
                    body = bytes(buffer[4 : 4 + size])
                    del buffer[: 4 + size]
                    return wire.parse_frame(body)
            self._wait(self._out, select.POLLIN)
            try:
                chunk = os.read(self._out, 1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                raise _Closed(self.process, self.who)
            buffer += chunk

    def _wait(self, fd: int, event: int) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout
        poller = select.poll()
        poller.register(fd, event)
        if not poller.poll(remaining * 1000):
            raise _Timeout

    def close(self) -> None:
        """Kill the sandbox and everything in it, and return only when all of it is
        gone: the sandbox's pid 1 exits last, after every process in its namespace."""
        process = self.process
        init = _pidfd_of_child(process.pid)  # bwrap's one child: the sandbox's pid 1
        if init is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(init, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        if init is not None:
            poller = select.poll()
            poller.register(init, select.POLLIN)
            poller.poll(10_000)  # readable once it has exited
            os.close(init)
        for stream in (process.stdin, process.stdout, process.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        if workdir := getattr(process, "workdir", None):  # SELFIMPROVE_CODE_SANDBOX=none
            shutil.rmtree(workdir, ignore_errors=True)


def _runner() -> str:
    # The judge's pid on the command line: `ps` shows who started a sandbox.
    return f"{RUNNER_SOURCE}\n# judge {os.getpid()}\n"


def _pidfd_of_child(pid: int) -> int | None:
    """A pidfd of the one child of `pid` (None without one). Safe from pid reuse: the
    child stays a zombie until its parent, still alive here, waits for it."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return os.pidfd_open(int(children[0])) if children else None
    except (OSError, ValueError, AttributeError):
        return None


def _ended(process: subprocess.Popen, who: str) -> tuple[str, str]:
    """Why a process stopped answering, from its exit status (bwrap exits 128 + the
    signal that killed the sandboxed interpreter)."""
    try:
        code = process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return "crashed", f"the {who} process closed its output"
    number = -code if code < 0 else code - 128 if code > 128 else None
    if number is not None:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        why = " (CPU time limit)" if name == "SIGXCPU" else ""
        return "killed", f"{name}{why}"
    stderr = b""
    with contextlib.suppress(OSError, ValueError):
        os.set_blocking(process.stderr.fileno(), False)
        stderr = process.stderr.read(2000) or b""
    words = stderr.decode(errors="replace").strip().splitlines()
    detail = f": {words[-1][:200]}" if words and who == "candidate" and code == 1 else ""
    return "crashed", f"the {who} process exited with code {code} before the tests finished{detail}"


@lru_cache(maxsize=4096)
def _plans(
    tests: tuple[str, ...],
    entry_point: str | None,
    helper_names: frozenset[str],
    task_names: frozenset[str],
) -> list[SplitTest | ProcessTest]:
    return plan_tests(tests, entry_point, helper_names, task_names)


def _short(text: str | None, limit: int = 80) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "CandidateJob",
    "SandboxLimits",
    "SandboxResult",
    "default_workers",
    "judge",
    "run_program",
    "run_programs",
    "sandbox_description",
    "sandbox_kind",
]
