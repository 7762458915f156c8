"""Runs one candidate program against its tests inside the sandbox (a child process).

Not imported by the package: `sandbox.py` copies this file into the candidate's fresh
temporary directory and starts it with `python -I -S sandbox_runner.py`, so it uses
the standard library only. Order matters: read the job (then delete it, so the
candidate cannot read the tests), set the resource limits, drop root, install the
audit hook, silence stdout/stderr, then run setup, candidate and tests one by one, and
write `result.json` with the nonce the parent sent on stdin.

Usage (by sandbox.py only): python -I -S sandbox_runner.py CPU_S MEM_BYTES FSIZE NPROC
"""

import json
import os
import resource
import sys

WORKDIR = os.path.realpath(os.getcwd())
NOBODY = 65534

# Standard-library modules a candidate may import. They are imported before the runner
# drops root: as `nobody` the interpreter's own files may be unreadable (a Python
# installed under /root), so later imports of these hit sys.modules.
PREIMPORTED = (
    "array",
    "bisect",
    "cmath",
    "collections",
    "copy",
    "dataclasses",
    "datetime",
    "decimal",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "itertools",
    "math",
    "operator",
    "random",
    "re",
    "statistics",
    "string",
    "sys",
    "textwrap",
    "typing",
    "unicodedata",
)

# Audit events a candidate may never raise (process creation, raw memory access,
# introspection that would reach the runner's secrets).
_BLOCKED_EVENTS = {
    "os.fork",
    "os.forkpty",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.kill",
    "os.killpg",
    "subprocess.Popen",
    "pty.spawn",
    "ctypes.dlopen",
    "ctypes.dlsym",
    "ctypes.cdata",
    "ctypes.call_function",
    "sys._getframe",
    "gc.get_referrers",
    "gc.get_referents",
    "gc.get_objects",
    "socket.__new__",
    "socket.connect",
    "socket.bind",
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.sendto",
}
# Audit events whose first argument is a path that must stay inside WORKDIR.
_PATH_EVENTS = {
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.chown",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.utime",
    "shutil.rmtree",
    "shutil.move",
    "os.chdir",
}


def _inside(path) -> bool:
    if isinstance(path, int):
        return True  # an already open descriptor
    full = os.path.realpath(os.path.join(WORKDIR, os.fsdecode(path)))
    return full == WORKDIR or full.startswith(WORKDIR + os.sep)


def _audit(event, args):
    if event in _BLOCKED_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event in _PATH_EVENTS and args and not _inside(args[0]):
        raise PermissionError(f"sandbox: {event} outside the working directory")
    if event == "open" and args and args[0] is not None:
        mode, flags = (args[1] or "r"), (args[2] or 0)
        writes = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
        if writes and not _inside(args[0]):
            raise PermissionError("sandbox: writing outside the working directory")


def _limit(cpu_seconds, memory_bytes, file_bytes, processes):
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.getuid() == 0:  # root ignores RLIMIT_NPROC and owns everything: become nobody
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def _run(job, nonce):
    result = {"nonce": nonce, "status": "passed", "test_index": None, "test": None, "error": None}
    namespace = {"__name__": "__candidate__", "__builtins__": __builtins__}
    stage = "setup"
    try:
        if job.get("setup"):
            exec(compile(job["setup"], "<test_setup>", "exec"), namespace)
        stage = "candidate"
        exec(compile(job["program"], "<candidate>", "exec"), namespace)
        stage = "test"
        for i, test in enumerate(job["tests"]):
            result["test_index"], result["test"] = i, test
            exec(compile(test, f"<test {i + 1}>", "exec"), namespace)
        result["test_index"] = result["test"] = None
    except BaseException as err:  # SystemExit and KeyboardInterrupt are failures too
        result["status"] = "failed" if stage == "test" else f"{stage}_error"
        result["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return result


def main():
    nonce = sys.stdin.readline().strip()
    with open("job.json", encoding="utf-8") as f:
        job = json.load(f)
    os.remove("job.json")
    cpu, memory, fsize, nproc = (int(a) for a in sys.argv[1:5])
    result_path = os.path.join(WORKDIR, "result.json")
    for name in PREIMPORTED:
        __import__(name)
    _limit(cpu, memory, fsize, nproc)
    # The candidate's prints go nowhere (a flood of output must not fill a pipe).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.addaudithook(_audit)
    result = _run(job, nonce)
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os._exit(0)  # skip interpreter shutdown (candidate atexit hooks, __del__)


if __name__ == "__main__":
    main()
