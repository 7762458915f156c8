"""`selfimprove run` resumes a round whose run failed (or was killed) at the first step
whose tables are not current, instead of sampling everything again: the steps before
it keep their materializations when they were written with the same settings, after
the parent round, and passed their blocking checks. The round job is a stand-in with
the real job's name and two steps (generations -> eval_scores), so a round takes a
second; `tests/test_cli_record.py` covers the rest of the run command."""

import dagster as dg
import polars as pl
import pytest

from assets.partitions import ROUNDS
from assets.record import SETTINGS_TAG, round_steps, settings_fingerprint
from resources import StorageResource
from selfimprove_dagster import cli
from tests.conftest import StubStorageResource, StubStore

CALLS = {"generations": 0, "eval_scores": 0}
FAIL = {"eval_scores": False, "generations_gate": False}


@dg.asset(partitions_def=ROUNDS, name="generations")
def stand_in_generations(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    CALLS["generations"] += 1
    return dg.MaterializeResult()


@dg.asset_check(
    asset=stand_in_generations, name="check_gate_generations", blocking=True, partitions_def=ROUNDS
)
def generations_gate() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=not FAIL["generations_gate"])


@dg.asset(partitions_def=ROUNDS, name="eval_scores", deps=["generations"])
def stand_in_eval_scores(
    context: dg.AssetExecutionContext, storage: StorageResource
) -> dg.MaterializeResult:
    CALLS["eval_scores"] += 1
    if FAIL["eval_scores"]:
        raise RuntimeError("planted: the process died while scoring")
    row = {"round": context.partition_key, "accuracy_before": 0.1, "accuracy_after": 0.5}
    storage.store().write(context.partition_key, "eval_scores", pl.DataFrame([row]))
    return dg.MaterializeResult()


@dg.asset_check(
    asset=stand_in_eval_scores, name="check_gate_eval_scores", blocking=True, partitions_def=ROUNDS
)
def eval_gate() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


def define_stand_in_round_job(run_tags: dict[str, str] | None = None):
    return dg.define_asset_job(
        "round_job",
        selection=[stand_in_generations, stand_in_eval_scores],
        partitions_def=ROUNDS,
        run_tags=run_tags,
    )


round_job = define_stand_in_round_job()


@pytest.fixture
def store(cli_store, monkeypatch) -> StubStore:
    monkeypatch.setattr(cli, "refresh_policy", lambda defs, instance: None)
    monkeypatch.setitem(CALLS, "generations", 0)
    monkeypatch.setitem(CALLS, "eval_scores", 0)
    monkeypatch.setitem(FAIL, "eval_scores", False)
    monkeypatch.setitem(FAIL, "generations_gate", False)
    return cli_store


@pytest.fixture
def defs(store) -> dg.Definitions:
    return dg.Definitions(
        assets=[stand_in_generations, stand_in_eval_scores],
        asset_checks=[generations_gate, eval_gate],
        jobs=[round_job],
        resources={"storage": StubStorageResource(data_dir=str(store.data_dir))},
    )


def test_the_round_steps_are_in_run_order(defs):
    steps = round_steps(defs.assets)
    assert [s.name for s in steps] == ["generations", "eval_scores"]
    assert steps[1].parents == ("generations",)


def test_a_failed_round_resumes_at_the_step_that_failed(defs, store, capsys):
    FAIL["eval_scores"] = True
    assert cli._run_rounds(defs, store, 1) == 1
    assert CALLS == {"generations": 1, "eval_scores": 1}

    FAIL["eval_scores"] = False
    assert cli._run_rounds(defs, store, 1) == 0
    out = capsys.readouterr().out
    assert "round_000: resuming at `eval_scores` (generations: current, not run again)" in out
    assert CALLS == {"generations": 1, "eval_scores": 2}  # nothing sampled again
    # Done as recorded: eval_scores' own gate ran in the resumed run.
    assert cli._run_rounds(defs, store, 1) == 0
    assert "round_000: already complete, skipping" in capsys.readouterr().out


def test_changed_settings_run_the_whole_round_again(defs, store, monkeypatch, capsys):
    FAIL["eval_scores"] = True
    assert cli._run_rounds(defs, store, 1) == 1
    FAIL["eval_scores"] = False
    monkeypatch.setattr(cli, "settings_fingerprint", lambda defs: "other settings")
    assert cli._run_rounds(defs, store, 1) == 0
    assert "resuming" not in capsys.readouterr().out
    assert CALLS == {"generations": 2, "eval_scores": 2}


def test_a_step_whose_gate_failed_runs_again(defs, store, capsys):
    FAIL["generations_gate"] = True  # blocks eval_scores: the run fails at the gate
    assert cli._run_rounds(defs, store, 1) == 1
    assert CALLS == {"generations": 1, "eval_scores": 0}
    FAIL["generations_gate"] = False
    assert cli._run_rounds(defs, store, 1) == 0
    assert "resuming" not in capsys.readouterr().out
    assert CALLS == {"generations": 2, "eval_scores": 1}


def test_a_re_materialized_parent_round_runs_the_child_whole(defs, store, capsys):
    assert cli._run_rounds(defs, store, 1) == 0  # round_000 done
    FAIL["eval_scores"] = True
    assert cli._run_rounds(defs, store, 2) == 1  # round_001 dies after its generations
    FAIL["eval_scores"] = False
    # round_000 is materialized again (from the UI, say) after round_001's generations:
    # those were sampled from a policy that is no longer round_000's.
    instance = dg.DagsterInstance.get()
    defs.resolve_job_def("round_job").execute_in_process(
        partition_key="round_000", instance=instance
    )
    before = dict(CALLS)
    assert cli._run_rounds(defs, store, 2) == 0
    assert "round_001: resuming" not in capsys.readouterr().out
    assert CALLS["generations"] == before["generations"] + 1


def test_a_round_launched_outside_the_cli_is_resumed_by_it(store, capsys):
    """A run of the round job launched from the UI's Launchpad or by a sensor (here:
    executed directly, as the UI would, with no tags of its own) carries the settings
    the definitions were loaded with, so `selfimprove run` resumes it."""
    resources = {"storage": StubStorageResource(data_dir=str(store.data_dir))}
    tagged = define_stand_in_round_job(run_tags={SETTINGS_TAG: settings_fingerprint(resources)})
    defs = dg.Definitions(
        assets=[stand_in_generations, stand_in_eval_scores],
        asset_checks=[generations_gate, eval_gate],
        jobs=[tagged],
        resources=resources,
    )
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions("rounds", ["round_000"])
    FAIL["eval_scores"] = True
    result = defs.resolve_job_def("round_job").execute_in_process(
        partition_key="round_000", instance=instance, raise_on_error=False
    )
    assert not result.success
    assert result.dagster_run.tags[SETTINGS_TAG] == cli.settings_fingerprint(defs)
    FAIL["eval_scores"] = False
    assert cli._run_rounds(defs, store, 1) == 0
    assert "round_000: resuming at `eval_scores`" in capsys.readouterr().out
    assert CALLS == {"generations": 1, "eval_scores": 2}


def test_the_code_locations_round_job_tags_its_runs_with_the_settings():
    from selfimprove_dagster.definitions import build_definitions

    defs = build_definitions()
    job = defs.resolve_job_def("round_job")
    assert job.run_tags[SETTINGS_TAG] == cli.settings_fingerprint(defs)


def test_the_settings_fingerprint_follows_every_resource_field(store):
    def fingerprint(data_dir: str) -> str:
        return cli.settings_fingerprint(
            dg.Definitions(resources={"storage": StubStorageResource(data_dir=data_dir)})
        )

    assert fingerprint("a") == fingerprint("a") != fingerprint("b")


# --- for real: a `selfimprove run` process SIGKILLed mid-round, then run again ----------


def test_a_killed_run_resumes_after_its_last_current_step(tmp_path, tiny_model):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    data_dir = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIMPROVE_")}
    env.update(
        SELFIMPROVE_BASE_MODEL=tiny_model,
        SELFIMPROVE_N_TRAIN="32",
        SELFIMPROVE_N_EVAL="8",
        SELFIMPROVE_SAMPLES_PER_PROMPT="2",
        SELFIMPROVE_EVAL_SAMPLES_PER_PROMPT="0",
        SELFIMPROVE_MAX_NEW_TOKENS="24",
        SELFIMPROVE_TORCH_THREADS="1",
        DAGSTER_HOME=str(data_dir / "dagster_home"),
    )
    command = [sys.executable, "-m", "selfimprove_dagster.cli", "--data-dir", str(data_dir)]
    worker = subprocess.Popen(
        [*command, "run", "--rounds", "1"],
        env=env,
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:  # kill -9 the whole run as soon as its generations step has started
        deadline = time.monotonic() + 240
        while not step_started(data_dir, "generations"):
            assert worker.poll() is None, worker.stdout.read()
            assert time.monotonic() < deadline, "the generations step never started"
            time.sleep(0.2)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    assert materializations_of(data_dir, "generations") == 0

    again = subprocess.run(
        [*command, "run", "--rounds", "1"],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "marked failed: run" in again.stderr, again.stderr  # the killed run, noticed first
    assert "round_000: resuming at `generations` (prompts: current, not run again)" in again.stdout
    assert materializations_of(data_dir, "prompts") == 1  # not drawn again
    assert materializations_of(data_dir, "generations") == 1


def step_started(data_dir, step: str) -> bool:
    home = data_dir / "dagster_home"
    if not (home / "dagster.yaml").exists():
        return False
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return any(
            record.event_log_entry.step_key == step
            for run in instance.get_runs()
            for record in instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.STEP_START
            ).records
        )


def materializations_of(data_dir, key: str) -> int:
    home = data_dir / "dagster_home"
    if not (home / "dagster.yaml").exists():
        return 0
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return len(instance.fetch_materializations(dg.AssetKey(key), limit=10).records)
