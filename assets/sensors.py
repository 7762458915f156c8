"""Sensors and a schedule that keep the model evolving, round after round, and the
reading of Dagster's record they decide on (shared with the `selfimprove` CLI).

- `next_round_sensor` (off by default): when the latest round is done (see below), it
  adds partition N+1 and requests its `round_job` run in one `SensorResult`;
  otherwise it skips, and the skip reason is the stop rule that applied
  (`selfimprove_dagster.evolution`) or what is wrong with the latest round.
- `round_schedule` (off by default): the same decision every 30 minutes, for
  deployments that prefer a cron to a sensor. Turn on one of the two, not both.
- `round_failure_sensor`: logs the failed step and its error when a round run fails.

A round is done when Dagster recorded it, never because a file exists:

    the latest materialization of `eval_scores` for the round's partition exists,
    every blocking check of the code location passed on that partition (its latest
    evaluation, with no later planned-but-never-evaluated attempt), and
    no round asset upstream of `eval_scores` was materialized after it (its data
    version is current: a re-materialized `checkpoint` makes the round stale).

Before building round N+1 on round N, the sensor and the CLI also ask the round store
whether N's checkpoint chain verifies (`RoundStore.chain_problem`). Only public Dagster
APIs here (`instance.fetch_materializations`, `instance.get_event_records`, run
filters); tests/test_sensors.py greps for private imports.

Stop rules and the policy mode are the fields of `EvolutionResource`. Start the loop
from the UI (Automation → next_round_sensor → Start) or with `dagster sensor start`.
"""

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import dagster as dg
import polars as pl

from assets.partitions import ROUNDS
from resources import EvolutionResource, StorageResource
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.evolution import (
    Decision,
    StopRules,
    gate_failure_reason,
    next_round_decision,
)
from selfimprove_dagster.store.storage import RoundStore, previous_round, round_index

# The job by name: `assets/__init__.py` defines it and imports this module.
ROUND_JOB = "round_job"
EVAL_SCORES = dg.AssetKey("eval_scores")
PARTITION_TAG = "dagster/partition"
BACKFILL_TAG = "dagster/backfill"
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


# --- what Dagster recorded about a round ---------------------------------------------


@dataclass(frozen=True)
class GateResults:
    """Blocking checks whose latest result for a round is not a pass."""

    failed: list[str]  # evaluated and failed
    not_run: list[str]  # planned in a run but never evaluated (the run stopped earlier)


@dataclass(frozen=True)
class RoundRecord:
    """One round as the instance recorded it."""

    round: str
    materialized: bool  # an `eval_scores` materialization exists for the partition
    gates: GateResults
    newer: list[str] = field(default_factory=list)  # upstream assets materialized after it

    @property
    def done(self) -> bool:
        gates_ok = not self.gates.failed and not self.gates.not_run
        return self.materialized and gates_ok and not self.newer

    def problem(self) -> str | None:
        """Why the round is not done (None when it is), on one line."""
        if not self.materialized:
            return f"{self.round} has no recorded eval_scores materialization"
        bad = self.gates.failed + [f"{name} (did not run)" for name in self.gates.not_run]
        if bad:
            return gate_failure_reason(self.round, bad)
        if self.newer:
            return (
                f"{self.round} is stale: {', '.join(self.newer)} was re-materialized after its "
                f"eval_scores; re-run {self.round} (`selfimprove run` or the UI)"
            )
        return None


@dataclass(frozen=True)
class RoundGraph:
    """What the record is read against: the code location's blocking checks and the
    round assets upstream of `eval_scores` (both from its asset graph, so every gate or
    table another module wires in counts, with no list to keep in sync)."""

    blocking_checks: list[dg.AssetCheckKey]
    upstream: list[dg.AssetKey] = field(default_factory=list)

    @classmethod
    def of(cls, repository_def: dg.RepositoryDefinition | None) -> "RoundGraph":
        blocking = blocking_check_keys(repository_def)  # refuses a missing repository
        graph = repository_def.asset_graph
        upstream: set[dg.AssetKey] = set()
        todo = [EVAL_SCORES] if EVAL_SCORES in graph.materializable_asset_keys else []
        while todo:
            for parent in graph.get(todo.pop()).parent_keys:
                node = graph.get(parent) if parent in graph.materializable_asset_keys else None
                if node is not None and node.partitions_def == ROUNDS and parent not in upstream:
                    upstream.add(parent)
                    todo.append(parent)
        return cls(blocking, sorted(upstream, key=str))

    @classmethod
    def from_definitions(
        cls, assets: Iterable[dg.AssetsDefinition], checks: Iterable[dg.AssetChecksDefinition]
    ) -> "RoundGraph":
        """The same, from asset and check definitions (for a step run in process by
        `execute_in_process`, whose context has no repository to read it from)."""
        specs = {spec.key: spec for asset in assets for spec in asset.specs}
        blocking = {
            spec.key
            for definition in [*assets, *checks]
            for spec in definition.check_specs
            if spec.blocking
        }
        upstream: set[dg.AssetKey] = set()
        todo = [EVAL_SCORES] if EVAL_SCORES in specs else []
        while todo:
            for dep in specs[todo.pop()].deps:
                parent = specs.get(dep.asset_key)
                round_table = parent is not None and parent.partitions_def == ROUNDS
                if round_table and dep.asset_key not in upstream:
                    upstream.add(dep.asset_key)
                    todo.append(dep.asset_key)
        ordered = sorted(blocking, key=lambda key: key.to_user_string())
        return cls(ordered, sorted(upstream, key=str))


def round_graph(context: dg.AssetExecutionContext) -> RoundGraph:
    """The graph a step reads the record against: its repository's when the run has one
    (the UI, the daemon), else this package's round assets and checks
    (`execute_in_process`, as `selfimprove run` does, has no repository)."""
    try:
        return RoundGraph.of(context.repository_def)
    except Exception:  # Dagster's invariant error: "No repository definition was set"
        from assets import ROUND_ASSETS, ROUND_CHECKS

        return RoundGraph.from_definitions(ROUND_ASSETS, ROUND_CHECKS)


def blocking_check_keys(repository_def: dg.RepositoryDefinition | None) -> list[dg.AssetCheckKey]:
    """The blocking asset checks of the code location, from its asset graph."""
    if repository_def is None:
        raise SelfImproveError(
            "The next-round decision needs the code location's definitions to find the "
            "blocking gates",
            "in tests, build the context with `dg.build_sensor_context(definitions=defs, ...)`",
        )
    graph = repository_def.asset_graph
    keys = (key for key in graph.asset_check_keys if graph.get(key).blocking)
    return sorted(keys, key=lambda key: key.to_user_string())


class DagsterRecord:
    """Reads rounds from the instance's event log, once per decision (public APIs only).

    Check results are not indexed by partition in the event log's public filters, so the
    evaluations (and planned evaluations) are read once and grouped here. Events are
    ordered by timestamp: storage ids are not comparable across the per-run shards of
    a SQLite instance.
    """

    def __init__(self, instance: dg.DagsterInstance, graph: RoundGraph) -> None:
        self.instance = instance
        self.graph = graph
        self._seen: dict[str, RoundRecord] = {}

    def round(self, round_: str) -> RoundRecord:
        if round_ not in self._seen:
            self._seen[round_] = self._read_round(round_)
        return self._seen[round_]

    def _read_round(self, round_: str) -> RoundRecord:
        latest = self._latest_materialization(EVAL_SCORES, round_)
        newer = []
        if latest is not None:
            for key in self.graph.upstream:
                parent = self._latest_materialization(key, round_)
                if parent is None:
                    continue
                # Later, and from another run: tables written by the same run (e.g. the
                # eval_scores step's own eval_details) belong to this version.
                other_run = not parent.run_id or parent.run_id != latest.run_id
                if parent.timestamp > latest.timestamp and other_run:
                    newer.append(key.to_user_string())
        return RoundRecord(round_, latest is not None, self.gates(round_), newer)

    def gates(self, round_: str) -> GateResults:
        """The latest result of each blocking check on the round's partition."""
        evaluated = self._evaluations.get(round_, {})
        planned = self._planned.get(round_, {})
        failed, not_run = [], []
        for key in self.graph.blocking_checks:
            result = evaluated.get(key)  # (timestamp, passed)
            plan = planned.get(key)
            if result is not None and (plan is None or plan <= result[0]):
                if not result[1]:
                    failed.append(key.name)
            elif plan is not None:
                not_run.append(key.name)
        return GateResults(failed, not_run)

    def resume_point(self, round_: str, steps: "list[RoundStep]", settings: str) -> int:
        """How many of `steps` (in run order) a new run of `round_` can take as they are, so
        it starts at `steps[n]`. A step is taken when each of its tables was materialized
        by a run launched with the same `settings`, after the steps it reads and after the
        parent round's latest `eval_scores` (the policy it sampled from is still current),
        and each blocking check on its tables passed after that. The first step that is
        not taken, and every step after it, runs again. 0: the whole round runs."""
        parent = previous_round(round_)
        latest_parent = self._latest_materialization(EVAL_SCORES, parent) if parent else None
        floor = latest_parent.timestamp if latest_parent is not None else 0.0
        evaluated = self._evaluations.get(round_, {})
        for index, step in enumerate(steps):
            found = [self._latest_materialization(key, round_) for key in step.required]
            if not found or any(m is None for m in found):
                return index
            first = min(m.timestamp for m in found)
            if first <= floor or not all(
                _run_settings(self.instance, m.run_id) == settings for m in found
            ):
                return index
            for check in (c for c in self.graph.blocking_checks if c.asset_key in step.keys):
                result = evaluated.get(check)  # (timestamp, passed) of its latest evaluation
                if result is None or result[0] < first or not result[1]:
                    return index
            floor = max(floor, *(m.timestamp for m in found))
        return len(steps)

    def completed_rounds(self) -> list[str]:
        """The rounds that are done, in round order."""
        return [key for key in self.rounds() if self.round(key).done]

    def rounds(self) -> list[str]:
        """Every round partition the instance knows, in round order."""
        return sorted(self.instance.get_dynamic_partitions(ROUNDS.name), key=round_index)

    def history(self, store: RoundStore, rounds: Iterable[str]) -> pl.DataFrame:
        """The `eval_scores` rows of `rounds` (done rounds, as recorded), in order."""
        frames = [store.read(key, "eval_scores") for key in sorted(rounds, key=round_index)]
        return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()

    def _latest_materialization(self, key: dg.AssetKey, round_: str) -> Any:
        records_filter = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[round_])
        records = self.instance.fetch_materializations(records_filter, limit=1).records
        return records[0] if records else None

    @cached_property
    def _evaluations(self) -> dict[str, dict[dg.AssetCheckKey, tuple[float, bool]]]:
        """Round -> check -> (timestamp, passed) of its latest evaluation."""
        found: dict[str, dict[dg.AssetCheckKey, tuple[float, bool]]] = {}
        records_filter = dg.EventRecordsFilter(dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        for record in self.instance.get_event_records(records_filter, ascending=True):
            evaluation = record.event_log_entry.asset_check_evaluation
            if evaluation is None or evaluation.partition is None:
                continue
            by_check = found.setdefault(evaluation.partition, {})
            seen = by_check.get(evaluation.asset_check_key)
            if seen is None or record.timestamp >= seen[0]:
                by_check[evaluation.asset_check_key] = (record.timestamp, evaluation.passed)
        return found

    @cached_property
    def _planned(self) -> dict[str, dict[dg.AssetCheckKey, float]]:
        """Round -> check -> timestamp of the latest planned evaluation."""
        found: dict[str, dict[dg.AssetCheckKey, float]] = {}
        records_filter = dg.EventRecordsFilter(dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED)
        for record in self.instance.get_event_records(records_filter, ascending=True):
            event = record.event_log_entry.dagster_event
            if event is None:
                continue
            plan = event.asset_check_planned_data
            subset = plan.partitions_subset
            rounds = subset.get_partition_keys() if subset is not None else []
            for round_ in rounds:
                by_check = found.setdefault(round_, {})
                key = plan.asset_check_key
                by_check[key] = max(by_check.get(key, record.timestamp), record.timestamp)
        return found


# --- resuming a round whose run failed -------------------------------------------------

# Run tag: a fingerprint of every resource setting the run was launched with. A step's
# tables are reused by a later run only when that run has the same settings.
SETTINGS_TAG = "selfimprove/settings"


def settings_fingerprint(resources: Mapping[str, Any]) -> str:
    """A hash of every resource setting (`SELFIMPROVE_*` and profile defaults applied):
    a run's tables are reused by a later run only when this is unchanged. The
    definitions put it on the round job (`SETTINGS_TAG`), so a round launched from the
    UI or by a sensor is resumable by `selfimprove run` exactly like one it launched."""
    settings = {
        name: resource.model_dump()
        for name, resource in sorted(resources.items())
        if hasattr(resource, "model_dump")
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class RoundStep:
    """One op of the round job: the tables it materializes (`required`: the ones every
    run of it writes; optional tables such as `rollouts` are not) and the steps it reads."""

    name: str
    keys: tuple[dg.AssetKey, ...]
    required: tuple[dg.AssetKey, ...]
    parents: tuple[str, ...]


def round_steps(assets: Iterable[Any]) -> list[RoundStep]:
    """The round job's steps (the partitioned assets definitions), each after the steps
    it reads: the order a run executes them in."""
    defs = [a for a in assets if isinstance(a, dg.AssetsDefinition) and a.partitions_def == ROUNDS]
    step_of = {spec.key: d.node_def.name for d in defs for spec in d.specs}
    steps = {}
    for d in defs:
        name = d.node_def.name
        parents = {step_of[dep.asset_key] for spec in d.specs for dep in spec.deps}
        steps[name] = RoundStep(
            name,
            tuple(spec.key for spec in d.specs),
            tuple(spec.key for spec in d.specs if not spec.skippable),
            tuple(sorted(p for p in parents if p in step_of.values() and p != name)),
        )
    ordered: list[RoundStep] = []
    while len(ordered) < len(steps):
        done = {s.name for s in ordered}
        ready = [s for s in steps.values() if s.name not in done and set(s.parents) <= done]
        if not ready:
            raise SelfImproveError("the round job's steps depend on each other in a cycle")
        ordered.extend(sorted(ready, key=lambda s: s.name))
    return ordered


def _run_settings(instance: dg.DagsterInstance, run_id: str | None) -> str | None:
    run = instance.get_run_by_id(run_id) if run_id else None
    return None if run is None else run.tags.get(SETTINGS_TAG)


def chain_problem(store: RoundStore, round_: str) -> str | None:
    """Why round N+1 must not build on `round_`'s checkpoint (None when its chain
    verifies): `RoundStore.chain_problem` checks the content hashes of the chain."""
    return store.chain_problem(round_)


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


# --- the decision ------------------------------------------------------------------------


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
    graph: RoundGraph,
) -> RoundPlan:
    """Decide on the next round from Dagster's record (and the round store's rows).

    In order: a running round waits; a latest partition that is not done waits for a
    person (failed or unrun gates, a crash, a stale round: the sensor never retries a
    round by itself); a checkpoint chain that does not verify waits; otherwise the stop
    rules decide on the done rounds. A partition that was added but never ran is the
    next round.
    """
    running = unfinished_round_runs(instance)
    if running:
        run = running[0]
        where = run.tags.get(PARTITION_TAG, "a round")
        return _wait(f"{ROUND_JOB} is still running {where} (run {run.run_id[:8]})")
    record = DagsterRecord(instance, graph)
    rounds = record.rounds()
    latest = rounds[-1] if rounds else None
    done = [key for key in rounds if record.round(key).done]
    if latest is not None:
        state = record.round(latest)
        if state.materialized and (state.gates.failed or state.gates.not_run):
            # A stop with the round's figures: they say more than the gate's name.
            failed = state.gates.failed + [f"{n} (did not run)" for n in state.gates.not_run]
            history = record.history(store, [*done, latest])
            return RoundPlan(next_round_decision(history, False, rules, failed))
        if not state.done and state.materialized:
            return _wait(state.problem() or f"{latest} is not done")
        if not state.materialized and has_runs(instance, latest):
            return _wait(
                f"{latest} did not complete (no eval_scores): see its failed run, then "
                f"re-run {latest} from the UI or the CLI"
            )
    history = record.history(store, done)
    decision = next_round_decision(history, True, rules)
    if decision.proceed and done:
        problem = chain_problem(store, done[-1])
        if problem is not None:
            return _wait(f"not building on {done[-1]}: {problem}")
    add = decision.proceed and not instance.has_dynamic_partition(
        ROUNDS.name, str(decision.next_round)
    )
    return RoundPlan(decision, add_partition=add)


def unfinished_round_runs(
    instance: dg.DagsterInstance, round_: str | None = None
) -> list[dg.DagsterRun]:
    """Round runs (of one round, when given) that are queued, starting, running or
    being canceled."""
    tags = {PARTITION_TAG: round_} if round_ else None
    runs_filter = dg.RunsFilter(job_name=ROUND_JOB, statuses=UNFINISHED_STATUSES, tags=tags)
    return list(instance.get_runs(filters=runs_filter, limit=5))


def has_runs(instance: dg.DagsterInstance, round_: str) -> bool:
    """Any run (of any job) ever targeted this round's partition."""
    runs_filter = dg.RunsFilter(tags={PARTITION_TAG: round_})
    return bool(instance.get_run_ids(filters=runs_filter, limit=1))


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
        RoundGraph.of(context.repository_def),
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
