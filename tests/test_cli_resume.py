"""`selfimprove run` resumes a round whose run failed (or was killed) at the first step
whose tables are not current, instead of sampling everything again: the steps before
it keep their materializations when they were written with the same settings, after
the parent round, and passed their blocking checks. The round job is a stand-in with
the real job's name and two steps (generations -> eval_scores), so a round takes a
second; `tests/test_cli_record.py` covers the rest of the run command."""

import dagster as dg
import polars as pl
import pytest

from selfimprove_dagster import cli
from selfimprove_dagster.assets.loop import Loop
from selfimprove_dagster.assets.record import round_steps
from selfimprove_dagster.resources import TaskResource
from tests.conftest import StubStore, loop_handle, stand_in_loop

CALLS = {"generations": 0, "eval_scores": 0}
FAIL = {"eval_scores": False, "generations_gate": False}
LOOP = Loop("t")
ROUNDS = LOOP.partitions


@dg.asset(
    partitions_def=ROUNDS, key=LOOP.key("generations"), required_resource_keys=LOOP.resource_keys()
)
def stand_in_generations(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    CALLS["generations"] += 1
    # What every real step records: the settings its run resolved.
    return dg.MaterializeResult(metadata=LOOP.step(context).settings_metadata())


@dg.asset_check(
    asset=stand_in_generations, name="check_gate_generations", blocking=True, partitions_def=ROUNDS
)
def generations_gate() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=not FAIL["generations_gate"])


@dg.asset(
    partitions_def=ROUNDS,
    key=LOOP.key("eval_scores"),
    deps=[LOOP.key("generations")],
    required_resource_keys=LOOP.resource_keys(),
)
def stand_in_eval_scores(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    CALLS["eval_scores"] += 1
    if FAIL["eval_scores"]:
        raise RuntimeError("planted: the process died while scoring")
    step = LOOP.step(context)
    row = {"round": context.partition_key, "accuracy_before": 0.1, "accuracy_after": 0.5}
    step.store.write(context.partition_key, "eval_scores", pl.DataFrame([row]))
    return dg.MaterializeResult(metadata=step.settings_metadata())


@dg.asset_check(
    asset=stand_in_eval_scores, name="check_gate_eval_scores", blocking=True, partitions_def=ROUNDS
)
def eval_gate() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


round_job = dg.define_asset_job(
    LOOP.job_name, selection=[stand_in_generations, stand_in_eval_scores], partitions_def=ROUNDS
)


@pytest.fixture
def store(cli_store, monkeypatch) -> StubStore:
    monkeypatch.setattr(cli, "refresh_policy", lambda handle, instance: None)
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
        resources=stand_in_loop(store).resources(),
    )


@pytest.fixture
def handle(defs, store) -> cli.LoopHandle:
    return loop_handle(defs, store)


def test_the_round_steps_are_in_run_order(defs):
    steps = round_steps(defs.assets, LOOP)
    assert [s.name for s in steps] == ["t__generations", "t__eval_scores"]
    assert steps[1].parents == ("t__generations",)


def test_a_failed_round_resumes_at_the_step_that_failed(handle, defs, store, capsys):
    FAIL["eval_scores"] = True
    assert cli._run_rounds(handle, 1) == 1
    assert CALLS == {"generations": 1, "eval_scores": 1}

    FAIL["eval_scores"] = False
    assert cli._run_rounds(handle, 1) == 0
    out = capsys.readouterr().out
    assert "round_000: resuming at `t__eval_scores` (t__generations: current, not run again)" in out
    assert CALLS == {"generations": 1, "eval_scores": 2}  # nothing sampled again
    # Done as recorded: eval_scores' own gate ran in the resumed run.
    assert cli._run_rounds(handle, 1) == 0
    assert "round_000: already complete, skipping" in capsys.readouterr().out


def test_changed_settings_run_the_whole_round_again(handle, store, monkeypatch, capsys):
    FAIL["eval_scores"] = True
    assert cli._run_rounds(handle, 1) == 1
    FAIL["eval_scores"] = False
    monkeypatch.setattr(cli, "settings_fingerprint", lambda handle: "other settings")
    assert cli._run_rounds(handle, 1) == 0
    assert "resuming" not in capsys.readouterr().out
    assert CALLS == {"generations": 2, "eval_scores": 2}


def test_a_step_whose_gate_failed_runs_again(handle, defs, store, capsys):
    FAIL["generations_gate"] = True  # blocks eval_scores: the run fails at the gate
    assert cli._run_rounds(handle, 1) == 1
    assert CALLS == {"generations": 1, "eval_scores": 0}
    FAIL["generations_gate"] = False
    assert cli._run_rounds(handle, 1) == 0
    assert "resuming" not in capsys.readouterr().out
    assert CALLS == {"generations": 2, "eval_scores": 1}


def test_a_re_materialized_parent_round_runs_the_child_whole(handle, defs, store, capsys):
    assert cli._run_rounds(handle, 1) == 0  # round_000 done
    FAIL["eval_scores"] = True
    assert cli._run_rounds(handle, 2) == 1  # round_001 dies after its generations
    FAIL["eval_scores"] = False
    # round_000 is materialized again (from the UI, say) after round_001's generations:
    # those were sampled from a policy that is no longer round_000's.
    instance = dg.DagsterInstance.get()
    defs.resolve_job_def(LOOP.job_name).execute_in_process(
        partition_key="round_000", instance=instance
    )
    before = dict(CALLS)
    assert cli._run_rounds(handle, 2) == 0
    assert "round_001: resuming" not in capsys.readouterr().out
    assert CALLS["generations"] == before["generations"] + 1


def test_a_round_launched_outside_the_cli_is_resumed_by_it(handle, defs, store, capsys):
    """A run of the round job launched from the UI's Launchpad or by a sensor (here:
    executed directly, as the UI would, with no tags of its own) records the settings it
    resolved on every table, so `selfimprove run` resumes it."""
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(ROUNDS.name, ["round_000"])
    FAIL["eval_scores"] = True
    result = defs.resolve_job_def(LOOP.job_name).execute_in_process(
        partition_key="round_000", instance=instance, raise_on_error=False
    )
    assert not result.success
    FAIL["eval_scores"] = False
    assert cli._run_rounds(handle, 1) == 0
    assert "round_000: resuming at `t__eval_scores`" in capsys.readouterr().out
    assert CALLS == {"generations": 1, "eval_scores": 2}


def test_a_run_with_other_settings_is_not_resumed_as_the_same(handle, defs, store, capsys):
    """Launchpad config (here: run config) over the loop's settings is recorded: a later
    `selfimprove run` with the loop's own settings samples the round again."""
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(ROUNDS.name, ["round_000"])
    FAIL["eval_scores"] = True
    override = {"resources": {LOOP.resource_key("task"): {"config": {"n_train": 7}}}}
    result = defs.resolve_job_def(LOOP.job_name).execute_in_process(
        partition_key="round_000", instance=instance, raise_on_error=False, run_config=override
    )
    assert not result.success
    generations = result.asset_materializations_for_node("t__generations")[0].metadata
    assert generations["selfimprove/settings"].value != cli.settings_fingerprint(handle)
    changed = generations["selfimprove/settings_changed"].value
    assert "- task.n_train = 7 (default 200)" in changed
    FAIL["eval_scores"] = False
    assert cli._run_rounds(handle, 1) == 0
    assert "resuming" not in capsys.readouterr().out
    assert CALLS == {"generations": 2, "eval_scores": 2}


def test_the_settings_fingerprint_is_the_loops_resolved_settings(handle):
    from selfimprove_dagster.resources.settings import settings_fingerprint

    assert cli.settings_fingerprint(handle) == settings_fingerprint(handle.resources)
    other = {**handle.resources, "task": TaskResource(n_train=7)}
    assert settings_fingerprint(other) != cli.settings_fingerprint(handle)
