"""Sensors and a schedule that keep one loop evolving, round after round.

- `<loop>_next_round_sensor` (off by default): when the latest round is done, it adds
  partition N+1 and requests its round job run in one `SensorResult`; otherwise it
  skips, and the skip reason is the stop rule that applied or what is wrong with the
  latest round.
- `<loop>_round_schedule` (off by default): the same decision every 30 minutes, for
  deployments that prefer a cron to a sensor. Turn on one of the two, not both.
- `<loop>_round_failure_sensor`: logs the failed step and its error when a round fails.

Both decide with `evolution.decide_next` over a snapshot of Dagster's record
(`assets/record.py`: what "done" means), as `selfimprove run` does. Stop rules and the
policy mode are the loop's `evolution` settings. Start a loop from the UI (Automation →
<loop>_next_round_sensor → Start) or with `dagster sensor start`.
"""

from typing import Any

import dagster as dg

from selfimprove_dagster.assets.loop import LOOP_TAG, Loop
from selfimprove_dagster.assets.record import PARTITION_TAG, DagsterRecord, RoundGraph
from selfimprove_dagster.evolution import RoundPlan, decide_next


def plan_next(loop: Loop, context) -> RoundPlan:
    """The decision of a sensor or schedule tick, from its instance and code location.
    A tick launches no run of its own: it reads the loop's declared settings (its
    stop rules and its store), not a run's."""
    settings = loop.spec.resources
    store = settings["storage"].store()
    graph = RoundGraph.of(context.repository_def, loop)
    record = DagsterRecord(context.instance, graph, store.chain_problem)
    return decide_next(record.snapshot(), store.eval_history, settings["evolution"].rules())


def round_run_request(loop: Loop, round_: str, reason: str) -> dg.RunRequest:
    """The run of the loop's round job for one round; the run key makes a repeat a no-op."""
    return dg.RunRequest(
        run_key=f"{loop.name}:{round_}",
        partition_key=round_,
        job_name=loop.job_name,
        tags={"selfimprove/decision": reason, LOOP_TAG: loop.name},
    )


def next_round_sensor(loop: Loop) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"{loop.name}_next_round_sensor",
        job_name=loop.job_name,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=f"Adds and runs round N+1 of loop `{loop.name}` when round N completed "
        "with its gates passed, until a stop rule (max rounds, patience, regression, "
        "failed gate) says otherwise.",
    )
    def sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        """One SensorResult adds the partition and requests its run, so the run never
        targets a partition that does not exist yet. The cursor is the last requested
        round, so a tick before the daemon applied the request does not repeat it."""
        plan = plan_next(loop, context)
        decision = plan.decision
        if not decision.proceed or decision.next_round is None:
            return dg.SkipReason(decision.reason)
        round_ = decision.next_round
        if plan.add_partition and context.cursor == round_:
            return dg.SkipReason(f"{round_} already requested (waiting for the daemon to add it)")
        return dg.SensorResult(
            run_requests=[round_run_request(loop, round_, decision.reason)],
            dynamic_partitions_requests=[loop.partitions.build_add_request([round_])]
            if plan.add_partition
            else [],
            cursor=round_,
        )

    return sensor


def round_schedule(loop: Loop) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=f"{loop.name}_round_schedule",
        cron_schedule="*/30 * * * *",
        job_name=loop.job_name,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Every 30 minutes: starts loop `{loop.name}`'s next round when none is "
        "running and the stop rules allow (the cron alternative to the next-round sensor).",
    )
    def schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        """Schedules cannot return dynamic-partition requests, so the partition is added
        here, just before its run is requested (a partition without a run is picked up
        as the next round on a later tick)."""
        plan = plan_next(loop, context)
        decision = plan.decision
        if not decision.proceed or decision.next_round is None:
            return dg.SkipReason(decision.reason)
        if plan.add_partition:
            context.instance.add_dynamic_partitions(loop.partitions.name, [decision.next_round])
        return round_run_request(loop, decision.next_round, decision.reason)

    return schedule


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


def round_failure_sensor(loop: Loop) -> dg.SensorDefinition:
    # Every job of the code location is monitored; the body keeps to this loop's rounds.
    @dg.run_failure_sensor(
        name=f"{loop.name}_round_failure_sensor",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Logs the failed step and its error when a round of `{loop.name}` fails.",
    )
    def sensor(context: dg.RunFailureSensorContext) -> None:
        if context.dagster_run.job_name != loop.job_name:
            return
        failures = list(context.get_step_failure_events())
        context.log.error(
            describe_round_failure(context.dagster_run, failures, context.failure_event)
        )

    return sensor


def loop_sensors(loop: Loop) -> tuple[list[dg.SensorDefinition], list[dg.ScheduleDefinition]]:
    """The loop's sensors and schedule."""
    return [next_round_sensor(loop), round_failure_sensor(loop)], [round_schedule(loop)]
