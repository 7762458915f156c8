"""A browser check of the Dagster UI over a finished data dir (`make ui-check`).

    python deploy/ui_check.py --data-dir var [--port 3111] [--out var/ui-check]

Starts `selfimprove ui` on 127.0.0.1, drives Debian's chromium with Playwright (no
browser download: `executable_path=/usr/bin/chromium`), opens

    1. the asset graph                  (the round assets and promoted_policy/history)
    2. a round partition of eval_scores (its metadata: accuracy before -> after)
    3. the checks of filtered           (the blocking gates and their results)
    4. the promoted_policy asset        (promoted round, accuracy, reason)
    5. the run list                     (the round runs)

saves a screenshot of each under `--out`, and exits 1 when an element is missing or the
browser console logged an error. Stops the UI (and its process group) on the way out.
Run it after `make demo` (or a 1-round run into another data dir), before a release or
after a Dagster upgrade; it is not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT = 300  # seconds for `dagster dev` to answer on two busy cores
PAGE_TIMEOUT = 60_000  # milliseconds for a page's element to appear
# Console messages that are not the UI's fault (a headless browser with no network).
IGNORED_CONSOLE = ("favicon", "Failed to load resource: net::ERR_", "WebSocket")


@dataclass(frozen=True)
class Page:
    name: str  # screenshot file stem
    path: str  # URL path under the webserver
    expect: tuple[str, ...]  # texts that must appear
    forbid: tuple[str, ...] = ()  # regular expressions that must not match the page's text


# A raw float in metadata (0.43999999999999995): shown rounded (`assets.loop.tidy`).
RAW_FLOAT = r"\b\d\.\d{9,}\b"


def pages(round_: str, loop: str = "demo") -> list[Page]:
    partition = urllib.parse.quote(round_)
    return [
        # The global graph opens with one collapsed node per group: a group per loop.
        Page("1-asset-graph", "/asset-groups", (loop, "add2_grpo", "experiments")),
        Page(
            "2-eval-scores-partition",
            f"/assets/{loop}/eval_scores?view=partitions&partition={partition}",
            # The settings its run resolved, readable: what differs from the defaults.
            (round_, "accuracy_after", "selfimprove/settings_changed"),
            forbid=(RAW_FLOAT,),
        ),
        Page(
            "3-filtered-checks",
            f"/assets/{loop}/filtered?view=checks",
            ("check_min_rows_filtered",),
        ),
        Page("4-promoted-policy", f"/assets/{loop}/promoted_policy", ("promoted_round", "reason")),
        # Runs `selfimprove run` launched, under the job like runs launched in the UI.
        Page("5-runs", f"/locations/selfimprove_dagster/jobs/{loop}_round_job/runs", (round_,)),
        Page("6-experiments", "/assets/experiments", ("accuracy_per_round", "loops")),
        # The Launchpad's way to add a round partition.
        Page(
            "7-add-round-job",
            f"/locations/selfimprove_dagster/jobs/{loop}_add_round_job",
            (f"{loop}_add_round",),
        ),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def latest_round(data_dir: Path) -> str:
    """The highest round with a recorded eval_scores (from `selfimprove status --json`)."""
    out = subprocess.run(
        [sys.executable, "-m", "selfimprove_dagster.cli", "--data-dir", str(data_dir)]
        + ["status", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = json.loads(out.stdout)
    if not rows:
        raise SystemExit(f"ui-check: {data_dir} has no finished round; run `make demo` first")
    return rows[-1]["round"]


def start_ui(data_dir: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "selfimprove_dagster.cli", "--data-dir", str(data_dir)]
    return subprocess.Popen(
        [*command, "ui", "--port", str(port)],
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_ui(ui: subprocess.Popen) -> None:
    """SIGTERM `selfimprove ui`, which passes it on to dagster dev's process group."""
    if ui.poll() is None:
        ui.send_signal(signal.SIGTERM)
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(timeout=30)


def dismiss_welcome(page) -> None:
    """A fresh browser profile gets the "Join the Dagster community" dialog: Skip it."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=5000)
        skip.click()
    except Exception:  # no dialog (already dismissed in this browser profile)
        return


def check_pages(url: str, round_: str, out: Path) -> list[str]:
    """Open each page, wait for its texts, screenshot it; the problems found."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        console: list[str] = []
        page.on(
            "console",
            lambda message: console.append(message.text) if message.type == "error" else None,
        )
        page.on("pageerror", lambda error: console.append(f"page error: {error}"))
        for target in pages(round_):
            console.clear()
            page.goto(url + target.path, wait_until="domcontentloaded", timeout=PAGE_TIMEOUT)
            for text in target.expect:
                try:
                    page.get_by_text(text, exact=False).first.wait_for(timeout=PAGE_TIMEOUT)
                except PlaywrightTimeout:
                    problems.append(f"{target.name}: `{text}` not shown at {target.path}")
            dismiss_welcome(page)  # it shows once the app has loaded
            shown = page.inner_text("body")
            problems += [
                f"{target.name}: `{pattern}` matches `{match.group(0)}` at {target.path}"
                for pattern in target.forbid
                if (match := re.search(pattern, shown))
            ]
            page.wait_for_timeout(1500)  # let late requests settle before the screenshot
            page.screenshot(path=str(out / f"{target.name}.png"), full_page=True)
            errors = [m for m in console if not any(skip in m for skip in IGNORED_CONSOLE)]
            problems += [f"{target.name}: console error: {m}" for m in errors]
            print(f"ui-check: {target.name}: {'ok' if not errors else 'console errors'}")
        browser.close()
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="var", help="a data dir with finished rounds")
    parser.add_argument("--port", type=int, default=0, help="webserver port (0: a free one)")
    parser.add_argument("--out", default="var/ui-check", help="where screenshots go")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"ui-check: no browser at {CHROMIUM} (apt-get install chromium)")
    data_dir = Path(args.data_dir).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    round_ = latest_round(data_dir)
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    ui = start_ui(data_dir, port, out / "ui.log")
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not answers(url):
            if ui.poll() is not None or time.monotonic() > deadline:
                print((out / "ui.log").read_text()[-3000:], file=sys.stderr)
                raise SystemExit("ui-check: the UI did not start")
            time.sleep(1)
        print(f"ui-check: UI at {url} over {data_dir} (round {round_})")
        problems = check_pages(url, round_, out)
    finally:
        stop_ui(ui)
    for problem in problems:
        print(f"ui-check: FAIL {problem}", file=sys.stderr)
    print(f"ui-check: screenshots in {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
