"""`dg` (dagster-dg-cli) knows the project through `[tool.dg]` in pyproject.toml, with
the existing layout (issue 15.5): `dg check defs` and `dg list defs` in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DG = Path(sys.executable).with_name("dg")

pytestmark = pytest.mark.skipif(
    not DG.exists() and shutil.which("dg") is None,
    reason="dg is not installed (pip install -e '.[dev]')",
)


def dg(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIMPROVE_")}
    env["VIRTUAL_ENV"] = str(Path(sys.executable).parents[1])  # the project's venv
    return subprocess.run(
        [str(DG if DG.exists() else "dg"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dg_check_defs_loads_the_definitions():
    out = dg("check", "defs")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All definitions loaded successfully" in out.stdout + out.stderr


def test_dg_list_defs_shows_both_loops_and_the_comparison():
    out = dg("list", "defs", "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assets = {asset["asset_key"] for asset in listed["assets"]}
    for loop in ("demo", "add2_grpo"):
        tables = {"prompts", "eval_scores", "promoted_policy", "history"}
        assert {f"{loop}/{table}" for table in tables} <= assets
        jobs = {job["name"] for job in listed["jobs"]}
        assert {f"{loop}_round_job", f"{loop}_policy_job"} <= jobs
    assert "experiments" in assets


def test_dg_list_components_shows_the_loop_component():
    out = dg("list", "components")
    assert out.returncode == 0, out.stderr
    assert "selfimprove_dagster.components.SelfImproveLoop" in out.stdout
