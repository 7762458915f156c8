"""A run whose process dies stays STARTED in the instance until something notices:
here a real run in a subprocess is SIGKILLed, then the `selfimprove` CLI marks it
failed with the reason and gives its `model` pool slot back (issue 12.5). Also: the
local instance's dagster.yaml passes Dagster's schema and is managed by the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from selfimprove_dagster import cli
from selfimprove_dagster.profiles import LOCAL_INSTANCE_YAML, MODEL_POOL

REPO = Path(__file__).resolve().parents[1]

# A run that holds the model pool for a minute: long enough to be killed mid-step.
SLOW_RUN = textwrap.dedent(
    f"""
    import time
    import dagster as dg

    @dg.op(pool="{MODEL_POOL}")
    def slow_step():
        time.sleep(60)

    @dg.job
    def slow_job():
        slow_step()

    if __name__ == "__main__":
        slow_job.execute_in_process(
            instance=dg.DagsterInstance.get(), tags={{"dagster/partition": "round_000"}}
        )
    """
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIMPROVE_")}
    env.update(extra)
    return env


def wait_for_status(home: Path, status: dg.DagsterRunStatus, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            runs = instance.get_runs()
            if runs and runs[0].status == status:
                return runs[0]
        time.sleep(0.5)
    raise AssertionError(f"no run reached {status} within {timeout}s")


def test_a_killed_run_is_marked_failed_with_the_reason_by_the_cli(tmp_path):
    data_dir = tmp_path / "var"
    home = data_dir / "dagster_home"
    home.mkdir(parents=True)
    cli.write_instance_config(home / "dagster.yaml")
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN)
    env = clean_env(DAGSTER_HOME=str(home))
    worker = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path)
    try:
        run = wait_for_status(home, dg.DagsterRunStatus.STARTED)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            # While the process lives, the run is left alone.
            assert cli.mark_orphaned_runs(instance) == []
            assert cli.run_worker_pid(instance, run.run_id) == worker.pid
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)

    out = subprocess.run(
        [sys.executable, "-m", "selfimprove_dagster.cli", "--data-dir", str(data_dir), "status"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert f"marked failed: run {run.run_id[:8]} of slow_job (round_000)" in out.stderr

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        failures = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE
        ).records
        message = failures[-1].event_log_entry.dagster_event.message
        assert message.startswith(f"The run worker process (pid {worker.pid}) is gone")
        assert "re-run round_000" in message
        # The killed step's pool slot is free again for the next model-loading step.
        info = instance.event_log_storage.get_concurrency_info(MODEL_POOL)
        assert info.claimed_slots == []
        # A second start finds nothing more to do.
        assert cli.mark_orphaned_runs(instance) == []


def test_process_alive_tells_a_reaped_or_zombie_process_from_a_live_one():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert cli.process_alive(child.pid)
        child.kill()
        deadline = time.monotonic() + 10
        while cli.process_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # killed, not yet reaped: a zombie counts as gone
        assert not cli.process_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not cli.process_alive(child.pid)


# --- the local instance's dagster.yaml ---------------------------------------------------


def test_local_instance_yaml_passes_dagsters_schema(tmp_path):
    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text(LOCAL_INSTANCE_YAML)
    config, _ = dagster_instance_config(str(tmp_path), "dagster.yaml")  # validates
    assert config["run_monitoring"]["enabled"] is True
    assert config["concurrency"]["pools"]["default_limit"] == 1
    limits = {
        limit["key"]: limit for limit in config["concurrency"]["runs"]["tag_concurrency_limits"]
    }
    assert limits["dagster/partition"]["limit"] == 1  # one run per round at a time
    assert limits["dagster/backfill"]["limit"] == 1  # a backfill's rounds one by one
    assert config["auto_materialize"] == {"enabled": True, "use_sensors": True}
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.run_monitoring_enabled


def test_the_cli_manages_its_dagster_yaml_but_never_a_users_own(tmp_path):
    path = tmp_path / "dagster.yaml"
    cli.write_instance_config(path)
    assert path.read_text() == LOCAL_INSTANCE_YAML
    path.write_text(cli.OLD_INSTANCE_YAML)  # what older versions wrote: upgraded
    cli.write_instance_config(path)
    assert path.read_text() == LOCAL_INSTANCE_YAML
    own = "# mine\ntelemetry:\n  enabled: true\n"
    path.write_text(own)
    cli.write_instance_config(path)
    assert path.read_text() == own


@pytest.mark.parametrize("path", ["deploy/dagster.yaml"])
def test_cluster_instance_limits_one_round_run_and_the_model_pool(path, monkeypatch):
    from dagster._core.instance.config import dagster_instance_config

    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_DB", "DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("SELFIMPROVE_IMAGE", "registry.example/selfimprove:1")
    config, _ = dagster_instance_config(str(REPO / Path(path).parent), Path(path).name)
    assert config["concurrency"]["pools"]["default_limit"] == 1
    runs = config["concurrency"]["runs"]
    assert runs["max_concurrent_runs"] == 1
    assert config["run_monitoring"]["enabled"] is True
