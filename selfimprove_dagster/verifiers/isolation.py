"""Where a candidate's process runs: a bubblewrap sandbox, or (explicit opt-in) none.

    sandbox_kind()         -> "bubblewrap" | "none"     # refuses when there is no sandbox
    sandbox_description()  -> {"sandbox": ..., ...}    # for a round's metadata
    launch(source)         -> Popen  # `python -I -S -c source` in a fresh sandbox

The setting `SELFIMPROVE_CODE_SANDBOX` picks the kind: `bubblewrap` (the default) or
`none`. With `bubblewrap` and no working bwrap, code verification refuses with one line
naming the fix; `none` runs candidates as plain child processes (resource limits only)
and every verdict says so.

A bubblewrap sandbox, one per process, fresh each time (`bwrap_command`):

- namespaces: user, pid, network, ipc, uts, cgroup (`--unshare-all --unshare-user`);
  the sandbox dies with the judge (`--die-with-parent`) and has no terminal
  (`--new-session`);
- a filesystem of its own: the interpreter, the shared libraries it and the standard
  library's extension modules link against, and the standard library (its
  site-packages covered by an empty read-only directory), all read-only; a private
  16 MiB tmpfs as the working directory; /proc of its own pid namespace (the judge's
  processes are not in it); /dev/null, /dev/zero, /dev/urandom; the root read-only.
  Nothing else of the host: not the project, the data dir, other candidates;
- an environment of LANG, HOME, TMPDIR and PATH only;
- the system-call filter of `verifiers/seccomp.py` (no new processes, no ptrace, no
  namespaces, no keyring);
- the candidate runs as uid 65534 inside and, outside, never as root: a non-root judge
  lets bwrap map its own uid (and forbid further user namespaces); a root judge maps
  65534 to 65534 itself and the runner drops to it before the candidate's code runs
  (`_launch_bwrap`), because uid 0 is exempt from RLIMIT_NPROC and may write /proc/sys
  whatever namespace it is in.

Killing bwrap kills the sandbox's pid 1, and with it every process in the namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.verifiers.seccomp import process_filter

SETTING = "SELFIMPROVE_CODE_SANDBOX"
KINDS = ("bubblewrap", "none")
WORKDIR = "/work"  # the candidate's private tmpfs inside the sandbox
SANDBOX_ID = "65534"  # uid and gid inside the sandbox ("nobody")
WORK_BYTES = 16 * 2**20  # size of the private tmpfs
ENV = {"LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
# Extension modules whose libraries are not bound (GUI, terminal, TLS, password and
# database files: of no use without a display, a terminal or a network). Importing one
# in the sandbox fails; fewer binds make a faster sandbox.
UNBOUND_MODULES = {
    "_tkinter", "readline", "_curses", "_curses_panel", "nis", "_ssl", "_dbm", "_gdbm",
    "_crypt", "spwd", "ossaudiodev",
}  # fmt: skip


def setting() -> str:
    """The sandbox kind asked for (`SELFIMPROVE_CODE_SANDBOX`, default `bubblewrap`)."""
    value = os.environ.get(SETTING, "").strip().lower() or "bubblewrap"
    if value not in KINDS:
        raise SelfImproveError(
            f"{SETTING}={value!r} is not a sandbox kind",
            f"set {SETTING} to `bubblewrap` (the default) or `none` (no sandbox, recorded)",
        )
    return value


def sandbox_kind() -> str:
    """The sandbox that judges code now: "bubblewrap", or "none" where that was asked
    for explicitly; a SelfImproveError when bubblewrap was asked for and cannot run."""
    kind = setting()
    if kind == "bubblewrap" and (why := bubblewrap_problem()) is not None:
        raise SelfImproveError(
            f"code verification needs a sandbox and bubblewrap cannot make one here ({why})",
            "install bubblewrap (`apt-get install bubblewrap`; `make install` does) and "
            f"allow user namespaces, or set {SETTING}=none to run candidates without a "
            "sandbox (recorded in every verdict)",
        )
    return kind


def sandbox_description() -> dict[str, str]:
    """What judges code, for a round's metadata (raises like `sandbox_kind`)."""
    kind = sandbox_kind()
    if kind == "none":
        return {
            "sandbox": "none",
            "setting": f"{SETTING}=none",
            "isolation": "child process with resource limits only (explicit opt-in)",
        }
    machine = os.uname().machine
    filtered = process_filter(machine) is not None
    layers = "namespaces user,pid,net,ipc,uts,cgroup; read-only interpreter and standard "
    layers += "library; private tmpfs; uid 65534" + ("; no new processes" if filtered else "")
    return {
        "sandbox": f"bubblewrap {_bwrap_version()}",
        "setting": f"{SETTING}=bubblewrap",
        "isolation": layers,
        "syscall_filter": machine if filtered else f"none (no table for {machine})",
        "python": sys.version.split()[0],
    }


def launch(source: str, *, filter_processes: bool = True) -> subprocess.Popen:
    """`python -I -S -c source` in a fresh sandbox of the current kind, with pipes on
    stdin, stdout and stderr. `filter_processes=False` leaves out the system-call
    filter (tests of the pid namespace only)."""
    if sandbox_kind() == "none":
        return _launch_unsandboxed(source)
    return _launch_bwrap(source, process_filter() if filter_processes else None)


def bwrap_command(source: str, extra: Sequence[str] = ()) -> list[str]:
    """The bwrap command line that runs `python -I -S -c source` in a fresh sandbox
    (`extra`: options for this one run: the filter, the root user's descriptors)."""
    python = interpreter()
    command = [
        _bwrap(),
        "--unshare-all",
        "--unshare-user",
        "--hostname",
        "sandbox",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ]
    # Parents of what is bound, readable by all (bwrap would copy a host mode such as
    # /root's 0700, and the candidate's uid could not reach the interpreter).
    parents = {str(p) for path in python.binds for p in Path(path).parents if str(p) != "/"}
    for path in sorted(parents, key=lambda p: p.count("/")):
        command += ["--perms", "0755", "--dir", path]
    for path in python.binds:
        command += ["--ro-bind", path, path]
    for path in python.hidden:
        command += ["--tmpfs", path, "--remount-ro", path]
    for device in DEVICES:
        command += ["--dev-bind", device, device]
    command += ["--proc", "/proc", "--perms", "0777", "--size", str(WORK_BYTES), "--tmpfs", WORKDIR]
    command += ["--chdir", WORKDIR, "--remount-ro", "/"]
    for name, value in {**ENV, "HOME": WORKDIR, "TMPDIR": WORKDIR}.items():
        command += ["--setenv", name, value]
    return [*command, *extra, "--", python.executable, "-I", "-S", "-c", source]


class Interpreter:
    """The base interpreter a sandbox runs, and the host paths it needs."""

    def __init__(self, executable: str, binds: tuple[str, ...], hidden: tuple[str, ...]):
        self.executable = executable  # real path of the base interpreter (not a venv's)
        self.binds = binds  # read-only: the executable, its libraries, the stdlib
        self.hidden = hidden  # covered by an empty read-only tmpfs (site-packages)


@cache
def interpreter() -> Interpreter:
    """The interpreter behind this one (a venv's base), its standard library and the
    shared libraries both need: found once per process by reading their ELF headers."""
    executable = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    dynload = Path(stdlib, "lib-dynload")
    modules = [p for p in dynload.glob("*.so") if p.name.split(".")[0] not in UNBOUND_MODULES]
    objects = [executable, *(str(p) for p in modules)]
    hidden = tuple(
        str(Path(stdlib, name))
        for name in ("site-packages", "dist-packages")
        if Path(stdlib, name).is_dir()
    )
    return Interpreter(executable, (executable, stdlib, *_shared_libraries(objects)), hidden)


@cache
def bubblewrap_problem() -> str | None:
    """Why bubblewrap cannot run a sandbox here (checked once per process), or None."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    try:
        process = _launch_bwrap("import sys; sys.stdout.write('ok')", process_filter())
        out, err = process.communicate(timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bwrap did not start: {error}"
    if out != b"ok":
        words = err.decode(errors="replace").strip().splitlines()
        return words[-1] if words else f"bwrap exited with {process.returncode}"
    return None


# --- helpers ---------------------------------------------------------------------


def _bwrap() -> str:
    return shutil.which("bwrap") or "bwrap"


@cache
def _bwrap_version() -> str:
    try:
        out = subprocess.run([_bwrap(), "--version"], capture_output=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.decode(errors="replace").split()[-1] if out.strip() else "?"


def _launch_bwrap(source: str, seccomp: bytes | None) -> subprocess.Popen:
    """Start bwrap. As root, bubblewrap would map the sandbox's uid to uid 0 outside,
    and uid 0 is exempt from RLIMIT_NPROC and owns /proc/sys: so root maps the
    sandbox's uids itself (0 -> 0 for bwrap's set-up, 65534 -> 65534), lets only
    CAP_SETUID/CAP_SETGID through, and the runner drops to 65534 before the candidate's
    code runs. Any other user: bwrap maps its uid to 65534 inside, one more user
    namespace below forbids new ones (`--disable-userns`)."""
    ours, theirs, extra = [], [], []  # descriptors: kept by the judge / passed to bwrap
    try:
        if seccomp is not None:
            read_end, write_end = os.pipe()
            os.write(write_end, seccomp)  # a few hundred bytes: fits the pipe
            os.close(write_end)
            theirs.append(read_end)
            extra += ["--seccomp", str(read_end)]
        root = os.getuid() == 0
        if root:
            info_read, info_write = os.pipe()
            block_read, block_write = os.pipe()
            ours += [info_read, block_write]
            theirs += [info_write, block_read]
            extra += ["--info-fd", str(info_write), "--userns-block-fd", str(block_read)]
            extra += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            extra += ["--disable-userns", "--uid", SANDBOX_ID, "--gid", SANDBOX_ID]
        process = subprocess.Popen(
            bwrap_command(source, extra),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
            pass_fds=theirs,
            start_new_session=True,
        )
        for fd in theirs:
            os.close(fd)
        theirs = []
        if root:
            _map_root_sandbox(info_read)
            with contextlib.suppress(BrokenPipeError):  # bwrap already failed: it says why
                os.write(block_write, b"1")  # the maps are written: bwrap goes on
        return process
    finally:
        for fd in ours + theirs:
            os.close(fd)


def _map_root_sandbox(info_fd: int) -> None:
    """Write the uid/gid maps of the sandbox bwrap just created (its child's pid comes
    on the info descriptor). Any failure leaves the maps empty: bwrap then fails."""
    import json
    import select

    data, poller = b"", select.poll()
    poller.register(info_fd, select.POLLIN)
    while poller.poll(10_000) and (chunk := os.read(info_fd, 4096)):
        data += chunk
    try:
        pid = int(json.loads(data)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return
    for name in ("uid_map", "gid_map"):
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/{name}").write_text(f"0 0 1\n{SANDBOX_ID} {SANDBOX_ID} 1\n")


def _launch_unsandboxed(source: str) -> subprocess.Popen:
    # Explicit opt-in only: a plain child process in a temporary directory with the
    # same pipes and resource limits (set by the runner); nothing else contains it.
    workdir = tempfile.mkdtemp(prefix="selfimprove-unsandboxed-")
    process = subprocess.Popen(
        [interpreter().executable, "-I", "-S", "-c", source],
        cwd=workdir,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**ENV, "HOME": workdir, "TMPDIR": workdir},
        start_new_session=True,
    )
    process.workdir = workdir  # removed by the judge when the process is gone
    return process


def _shared_libraries(objects: list[str]) -> list[str]:
    """The dynamic loader and every shared library `objects` need, transitively, where
    the loader will look for them (RUNPATH/RPATH, then the system directories)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    system = [f"/lib/{multiarch}", f"/usr/lib/{multiarch}", "/lib64", "/usr/lib64"]
    system += ["/lib", "/usr/lib"]
    found: dict[str, None] = {}
    pending = list(objects)
    seen: set[str] = set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        elf = _read_elf(path)
        if elf is None:
            continue
        loader, needed, search = elf
        if loader:
            found[loader] = None
        origin = os.path.dirname(path)
        dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in search]
        for name in needed:
            for directory in (*dirs, *system):
                candidate = os.path.join(directory, name)
                if os.path.exists(candidate):
                    found[candidate] = None
                    pending.append(os.path.realpath(candidate))
                    break
    return [p for p in found if os.path.exists(p)]


def _read_elf(path: str) -> tuple[str | None, list[str], list[str]] | None:
    """(PT_INTERP, DT_NEEDED names, RUNPATH/RPATH dirs) of a 64-bit little-endian ELF
    file, or None when it is not one."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", data, 32)[0],
        *struct.unpack_from("<HH", data, 54),
    )
    loads, dynamic, loader = [], None, None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
        elif p_type == 3:  # PT_INTERP
            loader = data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    if dynamic is None:
        return loader, [], []
    entries = [
        struct.unpack_from("<qQ", data, dynamic[0] + i) for i in range(0, dynamic[1] - 15, 16)
    ]
    strtab = next((v for tag, v in entries if tag == 5), None)  # DT_STRTAB (an address)
    offset = next(
        (o + strtab - va for va, o, size in loads if va <= (strtab or -1) < va + size), None
    )
    if offset is None:
        return loader, [], []

    def string(at: int) -> str:
        end = data.index(b"\0", offset + at)
        return data[offset + at : end].decode(errors="replace")

    needed = [string(v) for tag, v in entries if tag == 1]  # DT_NEEDED
    search = [d for tag, v in entries if tag in (15, 29) for d in string(v).split(":") if d]
    return loader, needed, search
