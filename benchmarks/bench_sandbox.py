"""The code judge's speed: the judge before issue 24 and today's, side by side, in one run.

    .venv/bin/python benchmarks/bench_sandbox.py                     # 100 MBPP rows
    .venv/bin/python benchmarks/bench_sandbox.py --rows 200 --repeats 3

Candidates are MBPP's reference solutions (../shared/data/mbpp/test.jsonl, the first
`--rows`), each judged against its three asserts: honest programs, so every candidate
runs all its tests. Two judges on the same rows:

- old: the judge of `--old-ref` (git), copied out of git into a temporary directory at
  run time: one `python -I -S` per candidate behind `unshare --net`, dropping to
  `nobody`, with an audit hook, the tests run in the candidate's own interpreter;
- new: `verifiers.code.verify_rows` now: a bubblewrap sandbox per candidate, the
  tests split, the comparisons made by the judge.

Each is timed with 1 worker and with 2, best of `--repeats`, alternating old and new so
that a change in the machine's load hits both. Then where one candidate's time goes
(medians of `--probes` runs, one worker): starting `python -I -S -c pass` bare; the same
inside a bubblewrap sandbox (the difference: bubblewrap's set-up); a whole verdict;
and a verdict from a sandbox started beforehand (what pre-started, single-use
sandboxes would save on the critical path). Prints the load average: other work on
the machine moves the absolute figures; the ratios hold better.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
OLD_REF = "e75dfc3"  # the last commit with the in-process judge (before issue 24)
OLD_FILES = ("code.py", "sandbox.py", "sandbox_runner.py")


def mbpp_rows(n: int) -> tuple[list[str], list[dict]]:
    records = [json.loads(line) for line in (SHARED_DATA / "mbpp" / "test.jsonl").open()][:n]
    rows = [
        {
            "answer": r["code"].replace("\r\n", "\n"),
            "tests": r["test_list"],
            "test_setup": r["test_setup_code"],
            "verifier": "code",
        }
        for r in records
    ]
    return [f"```python\n{row['answer']}\n```" for row in rows], rows


def old_judge(ref: str, folder: Path):
    """The code verifier of `ref`, imported from files `git show` writes to `folder`."""
    package = folder / "old_judge"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in OLD_FILES:
        text = subprocess.run(
            ["git", "show", f"{ref}:selfimprove_dagster/verifiers/{name}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        text = text.replace("selfimprove_dagster.verifiers.sandbox", "old_judge.sandbox")
        (package / name).write_text(text)
    sys.path.insert(0, str(folder))
    import old_judge.code

    return old_judge.code


def timed(judge, completions, rows, workers: int) -> tuple[float, list[bool]]:
    started = time.perf_counter()
    verdicts = judge.verify_rows(completions, rows, workers=workers)
    return time.perf_counter() - started, [v.correct for v in verdicts]


def compare(old, new, completions, rows, repeats: int) -> None:
    print(f"MBPP reference solutions, {len(rows)} rows x 3 asserts (candidates per second):")
    print("  workers        old        new   new/old   passed old / new")
    for workers in (1, 2):
        best = {"old": float("inf"), "new": float("inf")}
        passed = {}
        for _ in range(repeats):
            for name, judge in (("old", old), ("new", new)):
                seconds, verdicts = timed(judge, completions, rows, workers)
                best[name] = min(best[name], seconds)
                passed[name] = sum(verdicts)
        old_rate, new_rate = len(rows) / best["old"], len(rows) / best["new"]
        print(
            f"  {workers:7d} {old_rate:10.1f} {new_rate:10.1f} {new_rate / old_rate:8.2f}x"
            f"   {passed['old']} / {passed['new']}"
        )


def breakdown(probes: int, completions, rows) -> None:
    from selfimprove_dagster.verifiers import code, isolation, sandbox

    python = isolation.interpreter().executable

    def median_ms(action) -> float:
        times = []
        for _ in range(probes):
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    def in_sandbox():
        process = isolation.launch("pass")
        process.communicate()

    bare = median_ms(lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True))
    boxed = median_ms(in_sandbox)
    one = list(zip(completions, rows, strict=True))
    items = iter(one * (probes // len(one) + 1))
    verdict = median_ms(
        lambda: code.verify_rows(*map(list, zip(next(items), strict=True)), workers=1)
    )
    # Pre-started sandboxes: the same verdicts with the sandbox already running.
    started = [isolation.launch(sandbox._runner()) for _ in range(probes)]
    time.sleep(1.0)  # let them all reach the point where they wait for a job
    launch, sandbox.launch = sandbox.launch, lambda source: started.pop()
    items = iter(one * (probes // len(one) + 1))
    try:
        warm = median_ms(
            lambda: code.verify_rows(*map(list, zip(next(items), strict=True)), workers=1)
        )
    finally:
        sandbox.launch = launch
    print(f"where one candidate's time goes (median of {probes}, one worker, ms):")
    print(f"  python -I -S -c pass, bare                 {bare:7.1f}")
    print(
        f"  the same in a bubblewrap sandbox           {boxed:7.1f}   (set-up {boxed - bare:.1f})"
    )
    print(f"  a whole verdict (3 asserts)                {verdict:7.1f}")
    print(f"  a verdict from a pre-started sandbox       {warm:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100, help="MBPP test rows")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--probes", type=int, default=30, help="runs per breakdown figure")
    parser.add_argument("--old-ref", default=OLD_REF, help="git commit of the old judge")
    args = parser.parse_args()
    from selfimprove_dagster.verifiers import code, isolation

    print(f"load average before: {os.getloadavg()}  cores: {os.cpu_count()}")
    print(f"new judge: {isolation.sandbox_description()['sandbox']}, old judge: {args.old_ref}")
    completions, rows = mbpp_rows(args.rows)
    with tempfile.TemporaryDirectory(prefix="old-judge-") as folder:
        old = old_judge(args.old_ref, Path(folder))
        compare(old, code, completions, rows, args.repeats)
    breakdown(args.probes, completions, rows)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
