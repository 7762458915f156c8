"""Sensors and a schedule that keep the model evolving, round after round.

- `next_round_sensor` (off by default): when the latest round has completed (its
  `eval_scores` is materialized) and its blocking gates passed, it adds partition N+1
  and requests its `round_job` run in one `SensorResult`; otherwise it skips, and the
  skip reason is the stop rule that applied (`selfimprove_dagster.evolution`).
- `round_schedule` (off by default): the same decision every 30 minutes, for
  deployments that prefer a cron to a sensor. Turn on one of the two, not both.
- `round_failure_sensor`: logs the failed step and its error when a round run fails.

Stop rules and the policy mode are the fields of `EvolutionResource`. Start the loop
from the UI (Automation → next_round_sensor → Start) or with `dagster sensor start`.
"""

from dataclasses import dataclass
from typing import Any

import dagster as dg

# `PartitionKeyFilter` is not exported by `dagster` 1.13, but it is the only way to ask
# the event log for a check's latest result on one partition.
from dagster._core.event_api import PartitionKeyFilter

from assets.partitions import ROUNDS
from resources import EvolutionResource, StorageResource
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.evolution import (
    Decision,
    StopRules,
    gate_failure_reason,
    history_through,
    next_round_decision,
)
from selfimprove_dagster.store.storage import RoundStore, round_index

# The job by name: `assets/__init__.py` defines it and imports this module.
ROUND_JOB = "round_job"
EVAL_SCORES = dg.AssetKey("eval_scores")
PARTITION_TAG = "dagster/partition"
# Statuses of a run that has not finished (Dagster's NOT_FINISHED_STATUSES): one round
# at a time, so none of these may exist when the next round is requested.
UNFINISHED_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.SUSPENDED,
    dg.DagsterRunStatus.CANCELING,
]


# --- the decision, from the instance and the round store ----------------------------


@dataclass(frozen=True)
class RoundPlan:
    """A tick's decision, and whether its round must still be added as a partition
    (False when someone added the partition but it never ran)."""

    decision: Decision
    add_partition: bool = False


def plan_next_round(
    instance: dg.DagsterInstance,
    store: RoundStore,
    rules: StopRules,
    blocking_checks: list[dg.AssetCheckKey],
) -> RoundPlan:
    """Decide on the next round from Dagster's state and the rounds' `eval_scores`.

    In order: a running round waits; the latest partition's failed blocking gates stop
    the loop; a latest partition that ran but did not complete waits for a person (the
    sensor never retries a round by itself); otherwise the stop rules decide on the
    completed rounds. A partition that was added but never ran is the next round.
    """
    running = unfinished_round_runs(instance)
    if running:
        run = running[0]
        where = run.tags.get(PARTITION_TAG, "a round")
        return _wait(f"{ROUND_JOB} is still running {where} (run {run.run_id[:8]})")
    latest = latest_round(instance)
    failed: list[str] = []
    if latest is not None:
        gates = gate_results(instance, latest, blocking_checks)
        if not round_completed(instance, store, latest):
            if gates.failed:
                return _wait(gate_failure_reason(latest, gates.failed))
            if has_runs(instance, latest):  # a crash, not a gate: leave it to a person
                return _wait(
                    f"{latest} did not complete (no eval_scores): see its failed run, then "
                    f"re-run {latest} from the UI or the CLI"
                )
        # A completed round whose gate never ran has not passed it either.
        failed = gates.failed + [f"{name} (did not run)" for name in gates.not_run]
    history = history_through(store.history(), latest)  # rounds on disk beyond it: ignored
    decision = next_round_decision(history, not failed, rules, failed)
    add = decision.proceed and not instance.has_dynamic_partition(
        ROUNDS.name, str(decision.next_round)
    )
    return RoundPlan(decision, add_partition=add)


def unfinished_round_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """Round runs that are queued, starting, running or being canceled."""
    runs_filter = dg.RunsFilter(job_name=ROUND_JOB, statuses=UNFINISHED_STATUSES)
    return list(instance.get_runs(filters=runs_filter, limit=5))


def latest_round(instance: dg.DagsterInstance) -> str | None:
    """The highest round partition the instance knows (None before round_000)."""
    return max(instance.get_dynamic_partitions(ROUNDS.name), key=round_index, default=None)


def round_completed(instance: dg.DagsterInstance, store: RoundStore, round_: str) -> bool:
    """Dagster recorded the round's `eval_scores` materialization and its row is on disk.

    Both: the Parquet row is written before the asset returns (and before its checks
    run), so the file alone could belong to a step that then failed.
    """
    records_filter = dg.AssetRecordsFilter(asset_key=EVAL_SCORES, asset_partitions=[round_])
    recorded = instance.fetch_materializations(records_filter, limit=1).records
    return bool(recorded) and store.has(round_, "eval_scores")


def has_runs(instance: dg.DagsterInstance, round_: str) -> bool:
    """Any run (of any job) ever targeted this round's partition."""
    runs_filter = dg.RunsFilter(tags={PARTITION_TAG: round_})
    return bool(instance.get_run_ids(filters=runs_filter, limit=1))


def blocking_check_keys(repository_def: dg.RepositoryDefinition | None) -> list[dg.AssetCheckKey]:
    """The blocking asset checks of the code location (read from its asset graph, so
    every gate wired into the definitions counts, with no list to keep in sync)."""
    if repository_def is None:
        raise SelfImproveError(
            "The next-round decision needs the code location's definitions to find the "
            "blocking gates",
            "in tests, build the context with `dg.build_sensor_context(definitions=defs, ...)`",
        )
    graph = repository_def.asset_graph
    keys = (key for key in graph.asset_check_keys if graph.get(key).blocking)
    return sorted(keys, key=lambda key: key.to_user_string())


@dataclass(frozen=True)
class GateResults:
    """Blocking checks whose latest result for a round is not a pass."""

    failed: list[str]  # evaluated and failed
    not_run: list[str]  # planned in a run but never evaluated (the run stopped earlier)


def gate_results(
    instance: dg.DagsterInstance, round_: str, check_keys: list[dg.AssetCheckKey]
) -> GateResults:
    """The latest result of each check on the round's partition, from the event log."""
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        check_keys, partition_filter=PartitionKeyFilter(key=round_)
    )
    failed, not_run = [], []
    for key, record in sorted(latest.items(), key=lambda item: item[0].to_user_string()):
        evaluation = record.event.asset_check_evaluation if record.event else None
        if evaluation is None:
            not_run.append(key.name)
        elif not evaluation.passed:
            failed.append(key.name)
    return GateResults(failed, not_run)


def round_run_request(round_: str, reason: str) -> dg.RunRequest:
    """The run of `round_job` for one round; the run key makes a repeat a no-op."""
    return dg.RunRequest(
        run_key=f"round:{round_}",
        partition_key=round_,
        job_name=ROUND_JOB,
        tags={"selfimprove/decision": reason},
    )


def _wait(reason: str) -> RoundPlan:
    return RoundPlan(Decision(proceed=False, next_round=None, reason=reason))


# --- Dagster definitions ------------------------------------------------------------


def _plan(context, storage: StorageResource, evolution: EvolutionResource) -> RoundPlan:
    """The decision of a sensor or schedule tick, from its instance and code location."""
    return plan_next_round(
        context.instance,
        storage.store(),
        evolution.rules(),
        blocking_check_keys(context.repository_def),
    )


@dg.sensor(
    job_name=ROUND_JOB,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Adds and runs round N+1 when round N completed with its gates passed, "
    "until a stop rule (max rounds, patience, regression, failed gate) says otherwise.",
)
def next_round_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource, evolution: EvolutionResource
) -> dg.SensorResult | dg.SkipReason:
    """One SensorResult adds the partition and requests its run, so the run never
    targets a partition that does not exist yet. The cursor is the last requested
    round, so a tick before the daemon applied the request does not repeat it."""
    plan = _plan(context, storage, evolution)
    decision = plan.decision
    if not decision.proceed or decision.next_round is None:
        return dg.SkipReason(decision.reason)
    round_ = decision.next_round
    if plan.add_partition and context.cursor == round_:
        return dg.SkipReason(f"{round_} already requested (waiting for the daemon to add it)")
    return dg.SensorResult(
        run_requests=[round_run_request(round_, decision.reason)],
        dynamic_partitions_requests=[ROUNDS.build_add_request([round_])]
        if plan.add_partition
        else [],
        cursor=round_,
    )


@dg.schedule(
    cron_schedule="*/30 * * * *",
    job_name=ROUND_JOB,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every 30 minutes: starts the next round when none is running and the "
    "stop rules allow (the cron alternative to next_round_sensor).",
)
def round_schedule(
    context: dg.ScheduleEvaluationContext, storage: StorageResource, evolution: EvolutionResource
) -> dg.RunRequest | dg.SkipReason:
    """Schedules cannot return dynamic-partition requests, so the partition is added
    here, just before its run is requested (a partition without a run is picked up as
    the next round on a later tick)."""
    plan = _plan(context, storage, evolution)
    decision = plan.decision
    if not decision.proceed or decision.next_round is None:
        return dg.SkipReason(decision.reason)
    if plan.add_partition:
        context.instance.add_dynamic_partitions(ROUNDS.name, [decision.next_round])
    return round_run_request(decision.next_round, decision.reason)


def describe_round_failure(
    run: dg.DagsterRun, step_failures: list[dg.DagsterEvent], run_failure: dg.DagsterEvent
) -> str:
    """One line per failed step: run, round, step key and the error message."""
    head = f"{run.job_name} run {run.run_id[:8]} ({run.tags.get(PARTITION_TAG, 'no round')})"
    if not step_failures:  # failed outside a step, e.g. at launch
        return f"{head} failed: {run_failure.message}"
    return "\n".join(
        f"{head} failed at step `{event.step_key}`: {_root_error(event.step_failure_data.error)}"
        for event in step_failures
    )


def _root_error(error: Any) -> str:
    """The innermost error of a `SerializableErrorInfo` chain, on one line: a step's own
    exception is the cause of Dagster's "Error occurred while executing op" wrapper."""
    if error is None:
        return "no error recorded"
    while error.cause is not None:
        error = error.cause
    return " ".join(error.message.split())


# All jobs of the code location are monitored (the job object cannot be imported here
# without a cycle); the body keeps to round runs. Running by default: it only logs.
@dg.run_failure_sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Logs the failed step and its error when a round run fails.",
)
def round_failure_sensor(context: dg.RunFailureSensorContext) -> None:
    if context.dagster_run.job_name != ROUND_JOB:
        return
    failures = list(context.get_step_failure_events())
    context.log.error(describe_round_failure(context.dagster_run, failures, context.failure_event))


EVOLUTION_SENSORS = [next_round_sensor, round_failure_sensor]
EVOLUTION_SCHEDULES = [round_schedule]
