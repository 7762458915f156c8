"""`selfimprove ui` passes SIGTERM on to `dagster dev` and its process group (issue
15.6): a real `selfimprove ui` on a free port over a temporary data dir, stopped the way
a service manager stops it, leaves no webserver, daemon or code server behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from selfimprove_dagster.cli import process_alive

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 240  # dagster dev on two busy cores: webserver, daemon, code server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def test_sigterm_stops_the_webserver_and_the_daemon(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIMPROVE_")}
    env.pop("DAGSTER_HOME", None)
    log = (tmp_path / "ui.log").open("w")
    command = [sys.executable, "-m", "selfimprove_dagster.cli", "--data-dir", str(tmp_path)]
    ui = subprocess.Popen(
        [*command, "ui", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so the test's own group never gets the signal
    )
    started: set[int] = set()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not answers(port):
            assert ui.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the UI did not answer in time"
            time.sleep(1)
        started = descendants(ui.pid)
        assert len(started) >= 3, started  # dagster dev, the webserver, the daemon

        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=90) is not None
        deadline = time.monotonic() + 30
        while any(process_alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = sorted(pid for pid in started if process_alive(pid))
        assert left == [], f"still running after SIGTERM: {left}"
        assert not answers(port)
    finally:
        for pid in [ui.pid, *started]:  # only the processes this test started
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        ui.wait(timeout=30)
        log.close()
