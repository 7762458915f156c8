"""Red team: real hostile candidates through the real judge, one test per attack class.

Each attack of issue 24 is a program a policy under optimisation could write to make
the judge say "passed" without solving the task, or to reach outside its sandbox.
Every one goes through `verifiers.code.verify_row` (the function GRPO/RLOO rewards,
critiques and held-out evaluation reach through `verifiers.dispatch`). A wrong
program must be judged wrong; a probe that looks for a way out must find none (it
raises, naming what it reached, if it does); nothing a candidate started may be alive
after its batch. The last test runs this module again as a non-root user.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from selfimprove_dagster.verifiers import code, isolation
from selfimprove_dagster.verifiers.sandbox import SandboxLimits, run_programs

REPO = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(wall_seconds=3.0, cpu_seconds=1, memory_bytes=256 * 2**20)
RUNNER_MARK = "The sandboxed side of the code judge"
ADD_ROW = {
    "answer": "def add(a, b):\n    return a + b\n",
    "tests": ["assert add(1, 2) == 3", "assert add(20, 22) == 42", "assert add(-1, 1) == 0"],
    "test_setup": "",
}
WRONG_ADD = "def add(a, b):\n    return a - b\n"
# Hidden tests (HumanEval-style): the candidate cannot know the expected values, so a
# forged or guessed answer cannot pass. One split test, one the judge cannot split.
SECRET_A, SECRET_B = 918273645, 564738291
HIDDEN_ROWS = {
    "split": {
        "prompt": 'def secret(x):\n    """A hidden function."""\n',
        "entry_point": "secret",
        "answer": "",
        "tests": [
            f"def check(candidate):\n    assert candidate(3) == {SECRET_A}\n"
            f"    assert candidate(4) == {SECRET_B}\n"
        ],
    },
    "tests process": {
        "prompt": 'def secret(x):\n    """A hidden function."""\n',
        "entry_point": "secret",
        "answer": "",
        "tests": [
            "def check(candidate):\n"
            f"    for x, y in ((3, {SECRET_A}), (4, {SECRET_B})):\n"
            "        assert candidate(x) == y\n"
        ],
    },
}


def verdict(program: str, row: dict = ADD_ROW):
    return code.verify_row(f"```python\n{program}\n```", row, FAST)


def probe_row(name: str = "probe") -> dict:
    """A row whose test passes when the probe finds no way out ("clean")."""
    return {"answer": "", "tests": [f"assert {name}() == 'clean'"]}


def sandboxed_processes() -> list[int]:
    """Processes on this machine running a sandbox this test process started."""
    alive, judge = [], f"# judge {os.getpid()}\n".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if RUNNER_MARK.encode() in command and judge in command:
                alive.append(int(entry))
    return alive


@pytest.fixture(autouse=True)
def _no_sandbox_outlives_a_test():
    yield
    assert sandboxed_processes() == []


# --- forging the verdict -----------------------------------------------------------

FORGER = r"""
import gc, json, os, sys

def frame(message):
    body = json.dumps(message).encode()
    return len(body).to_bytes(4, "big") + body

# 1. Forged frames on every descriptor it has, the judge's channel among them.
for fd in range(64):
    for message in ({"ready": True}, {"ok": True}, {"status": "passed"}, {"passed": True},
                    {"done": 0, "error": None}, {"ok": {"t": []}}):
        try:
            os.write(fd, frame(message))
        except OSError:
            pass
# 2. Result files where the old judge looked for them.
for name in ("result.json", "/work/result.json", "/tmp/result.json", "../result.json"):
    try:
        json.dump({"status": "passed", "passed": True, "nonce": ""}, open(name, "w"))
    except OSError:
        pass
# 3. Patched modules: the wire format the runner uses, json, builtins.
runner = sys.modules["__main__"]
runner.encode = lambda value, _depth=0: True
runner.error_text = lambda err: "passed"
json.dumps = lambda *args, **kwargs: '{"ok": true}'
import builtins
builtins.AssertionError = type("AssertionError", (Exception,), {})
# 4. Frames and objects: clear test lists, rewrite requests, flip statuses.
for obj in gc.get_objects():
    if isinstance(obj, dict):
        for key in ("tests", "expr", "status", "failed"):
            if key in obj:
                try:
                    obj[key] = [] if key == "tests" else "True" if key == "expr" else "passed"
                except Exception:
                    pass
for frame_ in sys._current_frames().values():
    while frame_ is not None:
        frame_.f_globals.setdefault("verdict", "passed")
        frame_ = frame_.f_back

def secret(x):
    return 0

add = lambda a, b: a - b
"""


@pytest.mark.parametrize("row", ["add", "split", "tests process"])
def test_forging_the_verdict_with_frames_files_and_patched_modules(row):
    judged = verdict(FORGER, ADD_ROW if row == "add" else HIDDEN_ROWS[row])
    assert not judged.correct, judged.reason


# --- non-data results --------------------------------------------------------------

NOT_DATA = {
    "always equal": "class R:\n    def __eq__(self, other):\n        return True\n"
    "    __hash__ = object.__hash__\nadd = lambda a, b: R()\n",
    "int subclass": "class R(int):\n    def __eq__(self, other):\n        return True\n"
    "add = lambda a, b: R(0)\n",
    "str subclass": "class R(str):\n    def __eq__(self, other):\n        return True\n"
    "add = lambda a, b: R('x')\n",
    "list subclass": "class R(list):\n    def __eq__(self, other):\n        return True\n"
    "add = lambda a, b: R()\n",
    "spoofed class": "class R:\n    __class__ = property(lambda self: int)\n"
    "    def __eq__(self, other):\n        return True\nadd = lambda a, b: R()\n",
    "anything-goes mock": "class R:\n    def __getattr__(self, name):\n        return self\n"
    "    def __call__(self, *a, **k):\n        return self\n    def __eq__(self, other):\n"
    "        return True\nadd = lambda a, b: R()\n",
    "generator": "def add(a, b):\n    yield a + b\n",
    "self-containing list": "def add(a, b):\n    x = []\n    x.append(x)\n    return x\n",
    "nan": "add = lambda a, b: float('nan')\n",
    "exception object": "add = lambda a, b: ValueError(a + b)\n",
    "function": "add = lambda a, b: (lambda: a + b)\n",
}


@pytest.mark.parametrize("name", list(NOT_DATA))
def test_always_equal_and_other_non_data_results_are_wrong(name):
    judged = verdict(NOT_DATA[name])
    assert not judged.correct, judged.reason
    if name not in ("int subclass", "str subclass", "list subclass", "generator", "nan"):
        assert judged.reason.startswith("unserializable_result: test 1"), judged.reason


# --- shadowing names the tests use ------------------------------------------------

SHADOW_TESTS = [
    "assert math.isclose(halve(5), 2.5)",
    "assert abs(halve(3) - 1.5) < 1e-9",
    "assert round(halve(7), 1) == 3.5",
    "assert set(pair(1, 2)) == set([1, 2])",
    "assert sorted(pair(2, 1)) == [1, 2]",
    "assert len(pair(1, 1)) == 2",
    "assert isinstance(halve(2), float)",
    "assert sys.getsizeof(pair(1, 2)) == sys.getsizeof((2, 1))",
    "assert str(halve(1)) == '0.5'",
]
SHADOWER = """
import builtins, math, sys
math.isclose = lambda *a, **k: True
sys.getsizeof = lambda *a: 0
for name, fake in {"abs": lambda x: 0, "round": lambda *a: 3.5, "set": lambda *a: 1,
                   "sorted": lambda *a, **k: [1, 2], "len": lambda x: 2, "str": lambda x: "0.5",
                   "isinstance": lambda *a: True}.items():
    setattr(builtins, name, fake)
    globals()[name] = fake
"""


@pytest.mark.parametrize("test", SHADOW_TESTS)
def test_shadowing_names_the_tests_use_changes_nothing(test):
    row = {"answer": "def halve(x): ...\ndef pair(a, b): ...\n", "tests": [test]}
    wrong = SHADOWER + "def halve(x):\n    return 0\ndef pair(a, b):\n    return ()\n"
    assert not verdict(wrong, row).correct
    right = "set = sorted = len = None\ndef halve(x):\n    return x / 2\n"
    right += "def pair(a, b):\n    return (b, a)\n"
    assert verdict(right, row).correct  # its own `set = None` does not break the tests


def test_a_task_that_reuses_a_builtins_name_is_still_judged():
    row = {"answer": "def sum(a, b):\n    return a\n", "tests": ["assert sum(10, 15) == 10"]}
    assert verdict("def sum(a, b):\n    return a\n", row).correct
    assert not verdict("def sum(a, b):\n    return b\n", row).correct


# --- disabling guards -------------------------------------------------------------

GUARD_BREAKER = """
import ctypes, os, resource, signal
escaped = []
signal.signal(signal.SIGXCPU, signal.SIG_IGN)  # ignore the CPU limit's warning
for limit in (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_NPROC):
    try:
        resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        escaped.append(limit)
    except (ValueError, OSError):
        pass
libc = ctypes.CDLL(None)
libc.prctl(22, 0, 0, 0, 0)  # PR_SET_SECCOMP off: a filter cannot be removed
for attempt in (os.fork, lambda: os.posix_spawn("/bin/sh", ["sh"], {}),
                lambda: libc.unshare(0x10000000) == 0 or 1 / 0):
    try:
        attempt()
        escaped.append(attempt)
    except (OSError, ZeroDivisionError):
        pass

def add(a, b):
    if escaped:
        return a + b  # a guard is down: cheat
    while True:
        pass
"""


def test_in_process_guards_cannot_be_disabled():
    started = time.monotonic()
    judged = verdict(GUARD_BREAKER)
    assert not judged.correct
    assert judged.reason.startswith(("killed: SIGKILL", "timeout")), judged.reason
    assert time.monotonic() - started < FAST.wall_seconds + 2


# --- daemons, siblings, the judge -------------------------------------------------

TAMPERER = """
import glob, os, signal, threading, time
try:  # a double-forked setsid daemon that would outlive the verdict
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(60)
        os._exit(0)
except OSError:
    pass

def plant():  # a thread that keeps planting answers for later candidates
    while True:
        for path in ("/tmp/plant.py", "/work/plant.py", "/dev/shm/plant.py", "/plant.py",
                     *glob.glob("/tmp/selfimprove-*/*")):
            try:
                open(path, "w").write("def add(a, b):\\n    return a + b\\n")
            except OSError:
                pass
        time.sleep(0.005)

threading.Thread(target=plant, daemon=True).start()
for pid in os.listdir("/proc"):  # whatever siblings it can see
    if pid.isdigit() and int(pid) != os.getpid():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass

def add(a, b):
    return a - b
"""


def test_daemons_and_sibling_tampering_leave_later_batches_unaffected():
    right = code.program_for(ADD_ROW["answer"], ADD_ROW)
    programs = [TAMPERER, right, WRONG_ADD, right]
    for _ in range(3):  # several batches in a row, two candidates at a time
        jobs = [code.candidate_job(p, ADD_ROW) for p in programs]
        results = run_programs(jobs, FAST, workers=2)
        assert [r.passed for r in results] == [False, True, False, True]
        assert sandboxed_processes() == []  # nothing survives its batch


def test_the_pid_namespace_takes_every_process_with_the_sandbox():
    """The layer under the system-call filter: with the filter off, a double-forked
    setsid daemon starts, and still dies with its sandbox."""
    from selfimprove_dagster.verifiers.sandbox import _Channel

    source = (
        f"# {RUNNER_MARK}\n# judge {os.getpid()}\nimport os, sys, time\n"
        "child = os.fork()\nif child == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        time.sleep(60)\n    os._exit(0)\nos.waitpid(child, 0)\n"
        "time.sleep(0.2)\nsys.stdout.write(str(len([p for p in os.listdir('/proc') "
        "if p.isdigit()])))\nsys.stdout.flush()\ntime.sleep(60)\n"
    )
    process = isolation.launch(source, filter_processes=False)
    channel = _Channel(process, time.monotonic() + 10, "probe")
    try:
        channel._wait(process.stdout.fileno(), select.POLLIN)
        assert os.read(process.stdout.fileno(), 10) == b"3"  # pid 1, itself, the daemon
        assert len(sandboxed_processes()) == 4  # bwrap outside, and those three
    finally:
        channel.close()
    assert sandboxed_processes() == []


def test_killing_siblings_or_the_judge_fails():
    sibling = subprocess.Popen(["sleep", "30"])
    killer = f"""
import os, signal
for pid in [{os.getpid()}, {sibling.pid}, 1, os.getppid(), *range(2, 5000)]:
    if pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
try:
    os.kill(-1, signal.SIGKILL)
except OSError:
    pass

def add(a, b):
    return a - b
"""
    try:
        right = code.program_for(ADD_ROW["answer"], ADD_ROW)
        jobs = [code.candidate_job(p, ADD_ROW) for p in (killer, right, killer, right)]
        results = run_programs(jobs, FAST, workers=2)
        assert [r.passed for r in results] == [False, True, False, True]
        assert sibling.poll() is None  # the host process it named is alive; so is the judge
    finally:
        sibling.kill()
        sibling.wait()


# --- reading tests or expected values ---------------------------------------------

READER = """
import gc, os, sys
NEEDLES = ["".join(["91827", "3645"]), "".join(["56473", "8291"])]  # built at run time
TARGETS = {int(n) for n in NEEDLES}
OURS = (NEEDLES, TARGETS)

def found_in(data):
    if isinstance(data, bytes):
        return any(n.encode() in data for n in NEEDLES)
    return any(n in data for n in NEEDLES)

def look():
    where = []
    for obj in gc.get_objects():  # every container in memory: frames, dicts, lists
        if any(obj is ours for ours in OURS):
            continue
        items = obj.values() if isinstance(obj, dict) else obj
        if not isinstance(obj, (dict, list, tuple)):
            continue
        for item in list(items):
            if isinstance(item, str) and all(item is not n for n in NEEDLES) and found_in(item):
                where.append("memory: " + item[:60])
            if type(item) is int and item in TARGETS:
                where.append("memory int")
    for fd in range(64):  # descriptors: stdin, the judge's channel (nothing sent yet)
        try:
            blocking = os.get_blocking(fd)
            os.set_blocking(fd, False)
            try:
                if found_in(os.read(fd, 1 << 20)):
                    where.append(f"fd {fd}")
            finally:
                os.set_blocking(fd, blocking)
        except OSError:
            pass
    for pid in os.listdir("/proc"):  # other processes: command lines, environments, memory
        for part in ("cmdline", "environ"):
            try:
                if found_in(open(f"/proc/{pid}/{part}", "rb").read()):
                    where.append(f"/proc/{pid}/{part}")
            except OSError:
                pass
    for top, dirs, files in os.walk("/"):  # every file it can see
        if top.startswith(("/proc", sys.prefix, "/sys")):
            dirs[:] = []
            continue
        for name in files:
            try:
                if found_in(open(os.path.join(top, name), "rb").read(1 << 20)):
                    where.append(os.path.join(top, name))
            except OSError:
                pass
    for name in ("SELFIMPROVE_REDTEAM_SECRET",):
        if found_in(os.environ.get(name, "")):
            where.append("environment")
    return where

FOUND = look()

def secret(x):
    if FOUND:
        raise RuntimeError(f"found the expected values in {FOUND}")
    return 0
"""


@pytest.mark.parametrize("row", list(HIDDEN_ROWS))
def test_tests_and_expected_values_cannot_be_read(row, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFIMPROVE_REDTEAM_SECRET", f"{SECRET_A} {SECRET_B}")
    (tmp_path / "tests.txt").write_text(HIDDEN_ROWS[row]["tests"][0])
    judged = verdict(READER, HIDDEN_ROWS[row])
    assert not judged.correct
    assert judged.reason.endswith(": AssertionError"), judged.reason  # it found nothing


# --- network ------------------------------------------------------------------------


def test_no_network_reaches_the_judges_loopback():
    with socket.socket() as server, socket.socket(socket.AF_UNIX) as unix:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        abstract = f"\0selfimprove-redteam-{os.getpid()}"
        unix.bind(abstract)
        unix.listen()
        unix.setblocking(False)
        prober = f"""
import socket
def probe():
    reached = []
    for family, address in ((socket.AF_INET, ("127.0.0.1", {port})),
                            (socket.AF_INET6, ("::1", {port})),
                            (socket.AF_UNIX, {abstract!r})):
        try:
            with socket.socket(family) as s:
                s.settimeout(0.5)
                s.connect(address)
                reached.append(repr(address))
        except OSError:
            pass
    try:
        socket.create_connection(("localhost", {port}), timeout=0.5)
        reached.append("localhost")
    except OSError:
        pass
    if reached:
        raise RuntimeError(f"reached {{reached}}")
    return "clean"
"""
        judged = verdict(prober, probe_row())
        assert judged.correct, judged.reason
        for listener in (server, unix):
            with pytest.raises(BlockingIOError):
                listener.accept()  # no connection ever arrived


# --- writing outside the work dir ---------------------------------------------------


def test_writing_outside_the_work_dir_fails(tmp_path):
    os.chmod(tmp_path, 0o777)  # where the host would let anyone write
    writer = f"""
import os, sys
HOST = {str(tmp_path)!r}
ROOT = os.open("/", os.O_RDONLY | os.O_DIRECTORY)

def attempts():
    yield lambda: open(HOST + "/escaped.txt", "w").write("x")
    yield lambda: open("/escaped.txt", "w").write("x")
    yield lambda: open("/tmp/escaped.txt", "w").write("x")
    yield lambda: open(sys.prefix + "/escaped.txt", "w").write("x")
    yield lambda: (open("/work/a", "w").close(), os.rename("/work/a", "/escaped-rename"))
    yield lambda: (open("/work/b", "w").close(), os.rename("/work/b", HOST + "/renamed"))
    yield lambda: os.close(os.open("escaped-dirfd", os.O_CREAT | os.O_WRONLY, dir_fd=ROOT))
    yield lambda: os.mkdir("escaped-dir", dir_fd=ROOT)
    yield lambda: (os.symlink("/escaped-link", "/work/link"), open("/work/link", "w"))
    yield lambda: (os.symlink(HOST, "/work/host"), open("/work/host/escaped", "w"))
    yield lambda: os.link(sys.executable, "/work/hardlink")
    yield lambda: os.truncate(sys.executable, 0)
    yield lambda: os.chmod(sys.executable, 0o777)
    yield lambda: open("/dev/escaped", "w")
    yield lambda: open("/proc/sys/kernel/hostname", "w").write("x")

def probe():
    made = []
    for i, attempt in enumerate(attempts()):
        try:
            attempt()
            made.append(i)
        except OSError:
            pass
    if made:
        raise RuntimeError(f"wrote outside /work: attempts {{made}}")
    return "clean"
"""
    judged = verdict(writer, probe_row())
    assert judged.correct, judged.reason
    assert os.listdir(tmp_path) == []


# --- the same suite as a non-root user ----------------------------------------------


def test_the_red_team_suite_passes_as_a_non_root_user():
    """This module and tests/test_sandbox.py again, the judge itself running as uid
    65534 (nobody): bubblewrap then makes its user namespace unprivileged."""
    if os.getuid() != 0:
        pytest.skip("already running as a non-root user: the tests above are that run")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop to a non-root user")
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    site = sysconfig.get_paths()["purelib"]
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONPATH": f"{REPO}:{site}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    python, why = _python_for_nobody(as_nobody, env)
    if python is None:
        pytest.skip(f"no Python interpreter, repository and pytest uid 65534 can use: {why}")
    check = (
        "from selfimprove_dagster.verifiers.isolation import bubblewrap_problem as p; print(p())"
    )
    probe = subprocess.run(
        [*as_nobody, python, "-c", check], env=env, capture_output=True, text=True
    )
    if probe.stdout.strip() != "None":
        pytest.skip(f"bubblewrap cannot run as uid 65534 here: {probe.stdout or probe.stderr}")
    suite = ["tests/test_sandbox_redteam.py", "tests/test_sandbox.py", "-k", "not non_root"]
    run = subprocess.run(
        [*as_nobody, python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
        + ["--noconftest", *suite],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 40 and "skipped" not in run.stdout, run.stdout


def _python_for_nobody(as_nobody: list[str], env: dict[str, str]) -> tuple[str | None, str]:
    """An interpreter of this Python version that uid 65534 can run, whose own files
    (the base executable, the standard library) it can read, and that finds pytest on
    `env`'s PYTHONPATH."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    check = (
        "import os, sys, sysconfig, pytest\n"
        "exe = os.path.realpath(getattr(sys, '_base_executable', None) or sys.executable)\n"
        "stdlib = sysconfig.get_paths()['stdlib']\n"
        "assert os.access(exe, os.X_OK) and os.access(os.path.join(stdlib, 'os.py'), os.R_OK)\n"
    )
    why = "none found"
    for python in (sys.executable, shutil.which(version), f"/usr/bin/{version}"):
        if python and os.path.exists(python):
            probe = [*as_nobody, python, "-c", check]
            run = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True)
            if run.returncode == 0:
                return python, ""
            why = f"{python}: {(run.stderr.strip().splitlines() or ['?'])[-1]}"
    return None, why
