"""The signals that stop a command (SIGINT from Ctrl-C, SIGTERM, SIGHUP), named, so the
command can say in one line where it stopped and exit with 128 + the signal's number.

    with SignalWitness() as signals:
        ...                     # a signal raises Interrupted(signum) here, or is handed to
                                # the SIGINT handler a library installed meanwhile
        if signals.first:       # the first signal received, whoever handled it
            ...

While Dagster executes a run in process it replaces the SIGINT handler with its own and
points SIGTERM at it (it then fails the step with DagsterExecutionInterruptedError and
records the run as failed), so which signal came cannot be read from a handler. Python
writes the number of every signal it handles to the wakeup fd (`signal.set_wakeup_fd`)
before any handler runs: the witness reads them there. SIGHUP, which Dagster leaves
alone (its default would kill the process with the run still marked started), is handed
to whatever handles SIGINT at that moment, so it stops a run the way Ctrl-C does.

With `quiet=True` the witness also stands between file descriptor 2 and the terminal:
fd 2 becomes a pipe that a thread relays to the real stderr until a signal has come, and
drops after. So what follows a signal is not shown, whoever writes it: Dagster's console
log of the interrupted step (hundreds of lines of traces), and the children of the process
group that a Ctrl-C reaches too (Dagster's compute-log `tail` and its Python watcher, which
print KeyboardInterrupt traces of their own). The run's log in the instance keeps all of
it. Write the line that says what happened to `witness.stderr`, the real stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any, TextIO

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# How long the stderr relay holds a chunk before passing it on while no signal has come:
# a child of the process group may print its trace before this process's handler runs.
RELAY_GRACE_S = 0.05


class Interrupted(BaseException):
    """A signal stopped the command (a BaseException, like KeyboardInterrupt: `except
    Exception` blocks do not swallow it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal_name(signum))

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal's number (SIGINT 130, SIGTERM 143, SIGHUP 129)."""
    return 128 + signum


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block is done (for work that must not
    stop half way, such as creating the instance's databases); then they are raised again
    for the handlers in place before. (Handlers, not a signal mask: the kernel may hand a
    signal to any thread, and Python runs its handler in the main thread regardless.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


class SignalWitness:
    """Records SIGINT, SIGTERM and SIGHUP while active (main thread only); see the module
    docstring. Handlers, the wakeup fd and fd 2 in place before are restored on exit."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.received: list[int] = []
        self.stderr: TextIO = sys.stderr  # the real stderr (quiet: fd 2 is the relay)
        self._pipe: tuple[int, int] | None = None
        self._saved: dict[int, Any] = {}
        self._saved_wakeup = -1
        self._saved_fd2: int | None = None
        self._relay: threading.Thread | None = None
        self._lock = threading.Lock()  # the relay thread reads the wakeup pipe too

    @property
    def first(self) -> int | None:
        """The first of SIGNALS received so far (None: none)."""
        self._drain()
        return self.received[0] if self.received else None

    def _drain(self) -> None:
        with self._lock:
            while self._pipe is not None:
                try:
                    data = os.read(self._pipe[0], 512)
                except OSError:  # BlockingIOError: nothing (more) there
                    return
                if not data:
                    return
                self.received += [n for n in data if n in SIGNALS]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if signum == signal.SIGHUP and callable(handler) and handler != self._handle:
            handler(signal.SIGINT, frame)  # a library's SIGINT handler (Dagster's): its way
            return
        raise Interrupted(signum)

    def __enter__(self) -> SignalWitness:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self._pipe = (read, write)
        self._saved_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for signum in SIGNALS:
            self._saved[signum] = signal.signal(signum, self._handle)
        self.stderr = sys.stderr
        if self.quiet:
            self._start_relay()
        return self

    def __exit__(self, *exc: object) -> None:
        self._drain()
        self._stop_relay()
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved = {}
        signal.set_wakeup_fd(self._saved_wakeup)
        with self._lock:
            for fd in self._pipe or ():
                os.close(fd)
            self._pipe = None

    # --- fd 2 through a relay that goes quiet after a signal -------------------------

    def _start_relay(self) -> None:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stderr.flush()
        self._saved_fd2 = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        if _on_fd2(sys.stderr):  # else (a test's capture) it does not go through fd 2
            self.stderr = os.fdopen(os.dup(self._saved_fd2), "w", buffering=1)
        out = os.dup(self._saved_fd2)  # the relay's own: it may outlive this block
        self._relay = threading.Thread(target=self._forward, args=(read, out), daemon=True)
        self._relay.start()

    def _forward(self, read: int, out: int) -> None:
        """Copy the pipe to the real stderr until a signal has come (a chunk waits
        RELAY_GRACE_S first: a child's trace may beat this process's own handler)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # the main thread takes them
        with contextlib.suppress(OSError):
            while chunk := os.read(read, 65536):
                if self.first is None:
                    time.sleep(RELAY_GRACE_S)
                while chunk and self.first is None:
                    chunk = chunk[os.write(out, chunk) :]
        os.close(read)
        os.close(out)

    def _stop_relay(self) -> None:
        if self._saved_fd2 is None:
            return
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stderr.flush()
        os.dup2(self._saved_fd2, 2)  # the relay sees the end once no child holds the pipe
        if self._relay is not None:
            self._relay.join(timeout=1.0)
        if self.stderr is not sys.stderr:
            with contextlib.suppress(OSError):
                self.stderr.close()
        self.stderr = sys.stderr
        os.close(self._saved_fd2)
        self._saved_fd2 = None


def _on_fd2(stream: TextIO) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False
