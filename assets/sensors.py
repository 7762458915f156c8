"""Sensors and a schedule that keep the model evolving, round after round.

- `next_round_sensor` (off by default): when the latest round is done, it adds
  partition N+1 and requests its `round_job` run in one `SensorResult`; otherwise it
  skips, and the skip reason is the stop rule that applied or what is wrong with the
  latest round.
- `round_schedule` (off by default): the same decision every 30 minutes, for
  deployments that prefer a cron to a sensor. Turn on one of the two, not both.
- `round_failure_sensor`: logs the failed step and its error when a round run fails.

Both decide with `evolution.decide_next` over a snapshot of Dagster's record
(`assets/record.py`: what "done" means), as `selfimprove run` does. Stop rules and the
policy mode are the fields of `EvolutionResource`. Start the loop from the UI
(Automation → next_round_sensor → Start) or with `dagster sensor start`.
"""

from typing import Any

import dagster as dg

from assets.partitions import ROUNDS
from assets.record import (
    BACKFILL_TAG,
    PARTITION_TAG,
    ROUND_JOB,
    DagsterRecord,
    RoundGraph,
    round_graph,
)
from resources import EvolutionResource, StorageResource
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.evolution import RoundPlan, decide_next
from selfimprove_dagster.store.storage import previous_round, round_index


def check_round_order(context: dg.AssetExecutionContext) -> None:
    """A run started by a backfill over several rounds builds round N only on a round
    N−1 that is done as recorded (the instance runs a backfill's runs one at a time, in
    the order the backfill submits them; this refuses the rest when one fails).
    Called by the round's first step."""
    if BACKFILL_TAG not in context.run.tags:
        return
    round_ = context.partition_key
    parent = previous_round(round_)
    if parent is None:
        return
    record = DagsterRecord(context.instance, round_graph(context))
    known = record.rounds()
    problem = record.round(parent).problem() if parent in known else f"{parent} never ran"
    if problem is not None:
        raise SelfImproveError(
            f"Backfill {context.run.tags[BACKFILL_TAG]} reached {round_} but its parent "
            f"{parent} is not done ({problem})",
            f"fix and re-run {parent} first, then backfill from {round_}; or run "
            f"`selfimprove run --rounds {round_index(round_) + 1}`, which runs rounds in order",
        )


def _plan(context, storage: StorageResource, evolution: EvolutionResource) -> RoundPlan:
    """The decision of a sensor or schedule tick, from its instance and code location."""
    store = storage.store()
    graph = RoundGraph.of(context.repository_def)
    record = DagsterRecord(context.instance, graph, store.chain_problem)
    return decide_next(record.snapshot(), store.eval_history, evolution.rules())


def round_run_request(round_: str, reason: str) -> dg.RunRequest:
    """The run of `round_job` for one round; the run key makes a repeat a no-op."""
    return dg.RunRequest(
        run_key=f"round:{round_}",
        partition_key=round_,
        job_name=ROUND_JOB,
        tags={"selfimprove/decision": reason},
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
