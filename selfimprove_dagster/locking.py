"""Locks in a data dir that the kernel releases when their holder dies: one writer per
round, one creator of the Dagster instance.

    with claim_round(data_dir, "demo", "round_003", "selfimprove run"):
        ...                                   # the only process that runs demo's round_003
    check_round_free(data_dir, "demo", "round_003", "run 1a2b3c4d")  # a step of any run
    with creating_instance(data_dir):         # one process at a time creates the instance
        ...

Each lock is `fcntl.flock(LOCK_EX)` on `<data_dir>/locks/<name>.lock`. Taking it is one
system call, so of N processes that ask at the same instant exactly one gets it; it is
held while the file stays open and the kernel drops it when the process exits, however it
exits (`kill -9` included), so a dead holder never leaves a stale lock behind. The file
stays and names its last holder (pid, since when, what) for the message of the process
that is refused. A lock this process holds is re-entrant: flock counts two opens of one
file in one process as two holders, so the steps of a run that `selfimprove run`
executes in process see the round as theirs.

flock works on local file systems (and NFSv4 with its lock manager). Where it does not
(`LocksUnsupported`: some network mounts), the steps' check is skipped, the instance is
created unlocked and `selfimprove run` warns that it cannot claim the round. Under the
cluster profile the instance is Postgres and the run queue's tag limits serialize a
round's runs (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from selfimprove_dagster.errors import SelfImproveError, disk_full_error, is_disk_full

LOCKS_DIR = "locks"  # under the data dir
# How long a process waits for another one that is creating the Dagster instance (a few
# seconds on 2 busy cores) before it gives up with a message.
INSTANCE_WAIT_S = 120.0
POLL_S = 0.05

# Locks this process holds: path -> [file descriptor, depth].
_HELD: dict[str, list[int]] = {}


class LocksUnsupported(Exception):
    """The file system of the data dir has no working flock (some network mounts)."""


# flock's errors that mean "not on this file system", not "held by another process".
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockBusy(Exception):
    """Another process holds the lock; `holder` is what it wrote there (may be empty)."""

    def __init__(self, path: Path, holder: dict) -> None:
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {self.who}")

    @property
    def who(self) -> str:
        """The holder as a person reads it: "pid 1234 (selfimprove run, since <time>)"."""
        pid, what, since = (self.holder.get(k) for k in ("pid", "holder", "since"))
        if pid is None:
            return "another process"
        detail = ", ".join(str(x) for x in (what, f"since {since}" if since else None) if x)
        return f"pid {pid}" + (f" ({detail})" if detail else "")


def lock_path(data_dir: str | Path, name: str) -> Path:
    """The lock file `name` of a data dir (resolved: the CLI and the steps it runs in
    process must name one lock by one path, whichever way they reached the data dir)."""
    return Path(data_dir).resolve() / LOCKS_DIR / f"{name}.lock"


def round_lock_path(data_dir: str | Path, loop: str, round_: str) -> Path:
    return lock_path(data_dir, f"{loop}-{round_}")


def held_here(path: Path) -> bool:
    """Whether this process holds the lock at `path`."""
    return str(path) in _HELD


class DataDirLock:
    """The exclusive lock at `path`, taken by this process as `holder` (re-entrant)."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path, self.holder = path, holder
        self.key = str(path)

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take it, waiting up to `wait_s` seconds; `LockBusy` (naming the holder) when
        another process still holds it then."""
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            return
        fd = self._open()
        deadline = time.monotonic() + wait_s
        try:
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise LockBusy(self.path, read_holder(self.path))
                time.sleep(POLL_S)
            _write_holder(fd, self.holder)
        except OSError as error:
            os.close(fd)
            if error.errno in UNSUPPORTED:
                raise LocksUnsupported(f"{self.path}: {error.strerror}") from error
            raise
        except BaseException:
            os.close(fd)
            raise
        _HELD[self.key] = [fd, 1]

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if is_disk_full(error):
                raise disk_full_error("a lock file", self.path) from error
            raise SelfImproveError(
                f"Cannot create the lock file {self.path} ({error.strerror})",
                "make the data dir writable by this user, or point --data-dir elsewhere",
            ) from error

    def release(self) -> None:
        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.key]
            os.close(held[0])  # closing the last descriptor lets the lock go

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _write_holder(fd: int, holder: str) -> None:
    """Who holds it, for the message of a process that is refused (best effort: a full
    disk leaves the file empty, and the message then says "another process")."""
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    text = json.dumps({"pid": os.getpid(), "holder": holder, "since": since}) + "\n"
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)


def read_holder(path: Path) -> dict:
    """What the last holder of the lock wrote (empty when unreadable or being written)."""
    try:
        found = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


# --- the two locks of a data dir -------------------------------------------------------


@contextlib.contextmanager
def claim_round(data_dir: str | Path, loop: str, round_: str, holder: str) -> Iterator[None]:
    """Hold `round_` of `loop` for this process (refused, with who holds it, when another
    process does): `selfimprove run` holds it for the life of the round's run."""
    lock = DataDirLock(round_lock_path(data_dir, loop, round_), holder)
    held = True
    try:
        lock.acquire()
    except LockBusy as busy:
        raise SelfImproveError(
            f"{round_} of loop `{loop}` is being run by another process, {busy.who}; this "
            "command was refused and wrote nothing",
            "wait for that run to finish (`selfimprove status`, or Runs in the UI), then run "
            f"again; to stop it instead: `kill {busy.holder.get('pid', '<pid>')}`",
        ) from None
    except LocksUnsupported as unsupported:
        warnings.warn(
            f"file locks do not work here ({unsupported}): two `selfimprove run` started "
            "at once could both run this round (put the data dir on a local disk)",
            stacklevel=3,
        )
        held = False
    try:
        yield
    finally:
        if held:
            lock.release()


def check_round_free(data_dir: str | Path, loop: str, round_: str, holder: str) -> None:
    """A step of any run (the UI's, a sensor's, `selfimprove run`'s) starts only when no
    other process holds the round: taken and let go at once, so a step launched
    elsewhere while `selfimprove run` holds the round fails before it writes anything."""
    lock = DataDirLock(round_lock_path(data_dir, loop, round_), holder)
    if held_here(lock.path):
        return
    try:
        lock.acquire()
    except LocksUnsupported:  # a volume without flock (a cluster's shared one): no check
        return
    except LockBusy as busy:
        raise SelfImproveError(
            f"{round_} of loop `{loop}` is being run by another process, {busy.who}; this "
            "step stopped before writing anything",
            "wait for that run to finish, then materialize the round again (the UI, or "
            "`selfimprove run`)",
        ) from None
    lock.release()


@contextlib.contextmanager
def creating_instance(data_dir: str | Path, wait_s: float = INSTANCE_WAIT_S) -> Iterator[None]:
    """One process at a time creates (or upgrades) the Dagster instance in the data dir:
    two creating its SQLite databases at once trip over each other's tables."""
    lock = DataDirLock(lock_path(data_dir, "instance"), "creating the Dagster instance")
    held = True
    try:
        lock.acquire(wait_s)
    except LocksUnsupported:  # no flock on this file system: create it as before, unlocked
        held = False
    except LockBusy as busy:
        raise SelfImproveError(
            f"{busy.who} has been creating the Dagster instance in {data_dir} for over "
            f"{wait_s:.0f} s",
            f"wait for it, or stop it if it hangs (`kill {busy.holder.get('pid', '<pid>')}`) "
            "and run the command again",
        ) from None
    try:
        yield
    finally:
        if held:
            lock.release()
