"""Sensor and schedule ticks against a real (temporary) Dagster instance and a round
store with hand-written `eval_scores` rows.

The round job here is a stand-in with the real job's name, partitions and one blocking
check (`check_no_regression_eval_scores`), so ticks evaluate in milliseconds without
a model; the decision logic under test is the same. (No `from __future__ import
annotations` here: Dagster validates the `context` type hints of decorated functions.)
"""

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from selfimprove_dagster.assets.loop import Loop, LoopSpec
from selfimprove_dagster.assets.sensors import describe_round_failure, loop_sensors
from selfimprove_dagster.resources import EvolutionResource
from selfimprove_dagster.resources.settings import GROUPS
from selfimprove_dagster.store.storage import RoundStore
from tests.conftest import STORES, StubStorageResource, StubStore

warnings.filterwarnings("ignore", category=dg.PreviewWarning)

GATE = "check_no_regression_eval_scores"
LOOP = Loop("t")  # the stand-in loop's names: its partitions, keys and job
ROUNDS = LOOP.partitions
JOB = LOOP.job_name
FAILING_ROUND = "round_009"  # the stand-in eval_scores step raises for this round


@dg.asset(partitions_def=ROUNDS, key=LOOP.key("checkpoint"))
def stand_in_checkpoint() -> dg.MaterializeResult:
    return dg.MaterializeResult()


@dg.asset(partitions_def=ROUNDS, key=LOOP.key("eval_scores"), deps=[stand_in_checkpoint])
def stand_in_eval_scores(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    if context.partition_key == FAILING_ROUND:
        raise ValueError("held-out set is empty")
    return dg.MaterializeResult()


@dg.asset_check(asset=stand_in_eval_scores, name=GATE, blocking=True, partitions_def=ROUNDS)
def stand_in_gate(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    # Planted: round_001's gate fails (the real gate compares accuracy before/after).
    passed = context.partition_key != "round_001"
    return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.ERROR)


stand_in_job = dg.define_asset_job(
    JOB, selection=[stand_in_checkpoint, stand_in_eval_scores], partitions_def=ROUNDS
)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


@pytest.fixture
def persistent_instance() -> Iterator[dg.DagsterInstance]:
    """SQLite in a temp dir: schedule contexts and `evaluate_tick` need an instance ref."""
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def store(tmp_path) -> RoundStore:
    stub = StubStore(tmp_path / "var")
    STORES[str(stub.data_dir)] = stub
    return stub


def stand_in_loop(store: RoundStore, **rules: object) -> Loop:
    """The loop the sensors decide for: the stub store and these stop rules."""
    groups = {group: cls() for group, cls in GROUPS.items()}
    groups["storage"] = StubStorageResource(data_dir=str(store.data_dir))
    groups["evolution"] = EvolutionResource(**rules)
    return Loop.of(LoopSpec("t", groups))


def sensors(store: RoundStore, **rules: object):
    """(next_round_sensor, round_failure_sensor, round_schedule) of the stand-in loop."""
    (next_round, failure), (schedule,) = loop_sensors(stand_in_loop(store, **rules))
    return next_round, failure, schedule


def definitions(store: RoundStore, **rules: object) -> dg.Definitions:
    """The stand-in code location: the sensors' job, gate and resources resolve in it."""
    next_round, failure, schedule = sensors(store, **rules)
    return dg.Definitions(
        assets=[stand_in_checkpoint, stand_in_eval_scores],
        asset_checks=[stand_in_gate],
        jobs=[stand_in_job],
        sensors=[next_round, failure],
        schedules=[schedule],
        resources=stand_in_loop(store, **rules).resources(),
    )


def tick(instance, store, cursor: str | None = None, **rules: object):
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=definitions(store, **rules)
    ) as context:
        return sensors(store, **rules)[0](context)


def complete_round(
    instance: dg.DagsterInstance,
    store: RoundStore,
    round_: str,
    before: float,
    after: float,
    gate_passed: bool = True,
) -> None:
    """What a finished round leaves behind: its partition, its eval_scores row, the
    materialization and the blocking gate's result in the event log."""
    instance.add_dynamic_partitions(ROUNDS.name, [round_])
    row = {"round": round_, "accuracy_before": before, "accuracy_after": after}
    store.write(round_, "eval_scores", pl.DataFrame([row]))
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=LOOP.key("eval_scores"), partition=round_)
    )
    record_gate(instance, round_, gate_passed)


def record_gate(instance: dg.DagsterInstance, round_: str, passed: bool) -> None:
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(
            asset_key=LOOP.key("eval_scores"),
            check_name=GATE,
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR,
            blocking=True,
            partition=round_,
        )
    )


def run_round(instance, store, round_: str) -> dg.ExecuteInProcessResult:
    """Execute the stand-in round job: a real materialization and gate result."""
    job = definitions(store).resolve_job_def(JOB)
    return job.execute_in_process(instance=instance, partition_key=round_, raise_on_error=False)


def start_run(instance, store, round_: str, status: dg.DagsterRunStatus) -> dg.DagsterRun:
    """A run record in the given status (nothing executes; its checks are planned)."""
    job = definitions(store).resolve_job_def(JOB)
    tags = {"dagster/partition": round_}
    return instance.create_run_for_job(job_def=job, status=status, tags=tags)


# --- next_round_sensor ---------------------------------------------------------------


def test_adds_and_requests_the_next_round_in_one_result(instance, store):
    complete_round(instance, store, "round_000", 0.095, 0.65)
    complete_round(instance, store, "round_001", 0.65, 0.815)

    result = tick(instance, store)

    assert isinstance(result, dg.SensorResult)
    (add,) = result.dynamic_partitions_requests
    assert (add.partitions_def_name, list(add.partition_keys)) == ("t_rounds", ["round_002"])
    (request,) = result.run_requests
    assert (request.run_key, request.partition_key, request.job_name) == (
        "t:round_002",
        "round_002",
        "t_round_job",
    )
    assert request.tags["selfimprove/decision"] == (
        "round_001 improved 65.0% -> 81.5% → run round_002"
    )
    assert result.cursor == "round_002"


def test_the_request_resolves_against_the_job(persistent_instance, store):
    """Dagster accepts the run request for a partition the same result adds."""
    instance = persistent_instance
    with dg.build_sensor_context(
        instance=instance,
        # The ref lets evaluate_tick load the dynamic partitions, as the daemon does.
        instance_ref=instance.get_ref(),
        definitions=definitions(store),
    ) as context:
        data = sensors(store)[0].evaluate_tick(context)
    (request,) = data.run_requests
    assert request.partition_key == "round_000"
    assert request.tags["dagster/partition"] == "round_000"
    assert data.cursor == "round_000"


def test_does_not_request_the_same_round_twice(instance, store):
    complete_round(instance, store, "round_000", 0.095, 0.65)
    first = tick(instance, store)
    # The daemon has not applied the first result yet: same state, the new cursor.
    second = tick(instance, store, cursor=first.cursor)
    assert isinstance(second, dg.SkipReason)
    assert second.skip_message == "round_001 already requested (waiting for the daemon to add it)"


def test_waits_while_the_requested_round_runs(instance, store):
    complete_round(instance, store, "round_000", 0.095, 0.65)
    instance.add_dynamic_partitions(ROUNDS.name, ["round_001"])
    run = start_run(instance, store, "round_001", dg.DagsterRunStatus.STARTED)
    result = tick(instance, store, cursor="round_001")
    assert isinstance(result, dg.SkipReason)
    assert result.skip_message == f"t_round_job is still running round_001 (run {run.run_id[:8]})"


def test_skips_at_max_rounds(instance, store):
    for i, (before, after) in enumerate([(0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5)]):
        complete_round(instance, store, f"round_{i:03d}", before, after)
    result = tick(instance, store, max_rounds=4)
    assert result.skip_message == "max rounds reached (4)"


def test_skips_after_patience_rounds_without_improvement(instance, store):
    for i, (before, after) in enumerate([(0.095, 0.65), (0.65, 0.815), (0.815, 0.81)]):
        complete_round(instance, store, f"round_{i:03d}", before, after)
    complete_round(instance, store, "round_003", 0.81, 0.812)
    result = tick(instance, store, max_rounds=10, patience=2)
    assert result.skip_message == "no improvement for 2 rounds (best 81.5% at round_001)"


def test_skips_after_a_regression(instance, store):
    complete_round(instance, store, "round_000", 0.1, 0.5)
    complete_round(instance, store, "round_001", 0.5, 0.8)
    complete_round(instance, store, "round_002", 0.8, 0.6)
    result = tick(instance, store, max_rounds=10)
    assert result.skip_message == "round_002 regressed 80.0% -> 60.0%"


def test_skips_after_a_failed_blocking_gate(instance, store):
    complete_round(instance, store, "round_000", 0.1, 0.5)
    complete_round(instance, store, "round_001", 0.5, 0.8)
    complete_round(instance, store, "round_002", 0.8, 0.85, gate_passed=False)
    result = tick(instance, store, max_rounds=10)
    assert result.skip_message == f"a blocking gate failed in round_002: {GATE}"


def test_a_gate_that_passed_on_a_later_run_no_longer_blocks(instance, store):
    complete_round(instance, store, "round_000", 0.1, 0.5, gate_passed=False)
    run_round(instance, store, "round_000")  # re-run after a fix: the gate passes
    assert isinstance(tick(instance, store), dg.SensorResult)


def test_a_completed_round_whose_gate_never_ran_has_not_passed(instance, store):
    complete_round(instance, store, "round_000", 0.1, 0.5)
    # A later run planned the gate and stopped before evaluating it.
    start_run(instance, store, "round_000", dg.DagsterRunStatus.FAILURE)
    result = tick(instance, store)
    assert result.skip_message == f"a blocking gate failed in round_000: {GATE} (did not run)"


def test_reads_the_gate_result_of_a_real_run(instance, store):
    """round_001's stand-in gate fails in an executed run: the sensor stops on it."""
    complete_round(instance, store, "round_000", 0.1, 0.5)
    instance.add_dynamic_partitions(ROUNDS.name, ["round_001"])
    store.write("round_001", "eval_scores", pl.DataFrame([{"round": "round_001"}]))
    assert not run_round(instance, store, "round_001").success  # the failed gate fails the run
    result = tick(instance, store)
    assert result.skip_message == f"a blocking gate failed in round_001: {GATE}"


def test_a_round_that_ran_but_did_not_complete_waits_for_a_person(instance, store):
    complete_round(instance, store, "round_000", 0.1, 0.5)
    instance.add_dynamic_partitions(ROUNDS.name, ["round_001"])
    start_run(instance, store, "round_001", dg.DagsterRunStatus.FAILURE)
    result = tick(instance, store)
    assert result.skip_message.startswith("round_001 did not complete (no eval_scores)")


def test_a_partition_added_by_hand_is_run_without_adding_it_again(instance, store):
    complete_round(instance, store, "round_000", 0.1, 0.5)
    instance.add_dynamic_partitions(ROUNDS.name, ["round_001"])
    result = tick(instance, store)
    assert isinstance(result, dg.SensorResult)
    assert result.dynamic_partitions_requests == []
    assert [r.partition_key for r in result.run_requests] == ["round_001"]


# --- "done" is what Dagster recorded (issue 12.4) ---------------------------------------


def test_an_eval_scores_file_without_a_recorded_materialization_is_not_done(instance, store):
    # Planted: round_000's row is on disk, but Dagster never recorded the round.
    store.write("round_000", "eval_scores", pl.DataFrame([{"round": "round_000"}]))
    result = tick(instance, store)
    assert [r.partition_key for r in result.run_requests] == ["round_000"]


def test_a_run_that_died_after_writing_eval_scores_is_not_done(instance, store):
    complete_round(instance, store, "round_000", 0.1, 0.5)
    instance.add_dynamic_partitions(ROUNDS.name, ["round_001"])
    # Planted: the file was written, then the process died before Dagster recorded it.
    store.write("round_001", "eval_scores", pl.DataFrame([{"round": "round_001"}]))
    start_run(instance, store, "round_001", dg.DagsterRunStatus.FAILURE)
    result = tick(instance, store)
    assert result.skip_message.startswith("round_001 did not complete (no eval_scores)")


def test_a_round_whose_upstream_was_rematerialized_is_stale(instance, store):
    complete_round(instance, store, "round_000", 0.1, 0.5)
    # Planted: round_000's checkpoint re-materialized after its eval_scores.
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=LOOP.key("checkpoint"), partition="round_000")
    )
    result = tick(instance, store)
    assert result.skip_message == (
        "round_000 is stale: checkpoint was re-materialized after its eval_scores; "
        "re-run round_000 (`selfimprove run` or the UI)"
    )


def test_refuses_to_build_on_a_broken_checkpoint_chain(instance, store):
    complete_round(instance, store, "round_000", 0.1, 0.5)
    store.broken["round_000"] = "the parent of round_000 changed since it was trained"
    result = tick(instance, store)
    assert result.skip_message == (
        "not building on round_000: the parent of round_000 changed since it was trained"
    )


def test_the_record_reads_a_real_run(instance, store):
    from selfimprove_dagster.assets.record import DagsterRecord, RoundGraph

    instance.add_dynamic_partitions(ROUNDS.name, ["round_000", "round_001"])
    assert run_round(instance, store, "round_000").success
    assert not run_round(instance, store, "round_001").success  # its gate fails
    graph = RoundGraph.of(definitions(store).get_repository_def(), LOOP)
    assert graph.upstream == [LOOP.key("checkpoint")]
    record = DagsterRecord(instance, graph)
    assert record.done_rounds() == ["round_000"]
    assert record.round("round_001").problem() == f"a blocking gate failed in round_001: {GATE}"


def test_sensors_and_the_cli_use_public_dagster_apis_only():
    """Issue 15.4: no `dagster._` import (private modules change without notice)."""
    repo = Path(__file__).resolve().parents[1]
    files = [
        repo / "assets" / "sensors.py",
        repo / "assets" / "record.py",
        repo / "assets" / "policy.py",
        repo / "selfimprove_dagster" / "cli.py",
    ]
    private = re.compile(r"^\s*(from|import)\s+dagster\._|dagster\._[a-z]", re.MULTILINE)
    offenders = [str(f.relative_to(repo)) for f in files if private.search(f.read_text())]
    assert offenders == []


def test_sensor_and_schedule_are_off_by_default(store):
    next_round_sensor, _, round_schedule = sensors(store)
    assert next_round_sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert next_round_sensor.minimum_interval_seconds == 30
    assert round_schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert round_schedule.cron_schedule == "*/30 * * * *"


# --- round_schedule ------------------------------------------------------------------


def schedule_tick(instance, store, **rules: object):
    defs = definitions(store, **rules)
    # `with`: the context opens its own handle on the instance and must close it.
    with dg.build_schedule_context(
        instance=instance,
        repository_def=defs.get_repository_def(),
    ) as context:
        return sensors(store, **rules)[2](context)


def test_schedule_skips_while_a_round_runs(persistent_instance, store):
    instance = persistent_instance
    complete_round(instance, store, "round_000", 0.1, 0.5)
    run = start_run(instance, store, "round_000", dg.DagsterRunStatus.STARTED)
    result = schedule_tick(instance, store)
    assert isinstance(result, dg.SkipReason)
    assert result.skip_message == f"t_round_job is still running round_000 (run {run.run_id[:8]})"
    assert not instance.has_dynamic_partition(ROUNDS.name, "round_001")


def test_schedule_adds_and_requests_the_next_round(persistent_instance, store):
    instance = persistent_instance
    complete_round(instance, store, "round_000", 0.1, 0.5)
    assert run_round(instance, store, "round_000").success  # finished: does not block
    result = schedule_tick(instance, store)
    assert isinstance(result, dg.RunRequest)
    assert (result.run_key, result.partition_key) == ("t:round_001", "round_001")
    assert instance.has_dynamic_partition(ROUNDS.name, "round_001")


def test_schedule_obeys_the_stop_rules(persistent_instance, store):
    instance = persistent_instance
    complete_round(instance, store, "round_000", 0.1, 0.5)
    assert schedule_tick(instance, store, max_rounds=1).skip_message == "max rounds reached (1)"


# --- round_failure_sensor --------------------------------------------------------------


def failed_run_context(instance, store) -> dg.RunFailureSensorContext:
    instance.add_dynamic_partitions(ROUNDS.name, [FAILING_ROUND])
    result = run_round(instance, store, FAILING_ROUND)
    return dg.build_run_status_sensor_context(
        sensor_name="t_round_failure_sensor",
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    ).for_run_failure()


def test_failure_description_names_the_step_and_the_error(instance, store):
    context = failed_run_context(instance, store)
    message = describe_round_failure(
        context.dagster_run, list(context.get_step_failure_events()), context.failure_event
    )
    run_id = context.dagster_run.run_id[:8]
    assert message == (
        f"t_round_job run {run_id} ({FAILING_ROUND}) failed at step `t__eval_scores`: "
        "ValueError: held-out set is empty"
    )


def test_failure_sensor_logs_the_failed_step(instance, store, caplog):
    context = failed_run_context(instance, store)
    # The sensor's logger is not under the root logger: listen to it directly.
    context.log.addHandler(caplog.handler)
    sensors(store)[1](context)
    assert "failed at step `t__eval_scores`: ValueError: held-out set is empty" in caplog.text
