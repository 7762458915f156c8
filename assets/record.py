"""Reading Dagster's record of the rounds: what the sensors, the policy assets and the
`selfimprove` CLI decide on (public Dagster APIs only; tests/test_sensors.py greps for
private imports).

A round is done when Dagster recorded it, never because a file exists
(`evolution.RoundState.done`):

    the latest materialization of `eval_scores` for the round's partition exists,
    every blocking check of the code location passed on that partition (its latest
    evaluation, with no later planned-but-never-evaluated attempt), and
    no round asset upstream of `eval_scores` was materialized after it (its data
    version is current: a re-materialized `checkpoint` makes the round stale).

`DagsterRecord.snapshot()` turns that into plain data for `evolution.decide_next`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import dagster as dg

from assets.partitions import ROUNDS
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.evolution import RecordSnapshot, RoundState
from selfimprove_dagster.store.storage import RoundStore, previous_round, round_index

ROUND_JOB = "round_job"
EVAL_SCORES = dg.AssetKey("eval_scores")
PARTITION_TAG = "dagster/partition"
BACKFILL_TAG = "dagster/backfill"
# Run tag: a fingerprint of every resource setting the run was launched with. A step's
# tables are reused by a later run only when that run has the same settings.
SETTINGS_TAG = "selfimprove/settings"
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


@dataclass(frozen=True)
class RoundGraph:
    """What the record is read against: the code location's blocking checks and the
    round assets upstream of `eval_scores` (both from its asset graph, so every gate or
    table another module wires in counts, with no list to keep in sync)."""

    blocking_checks: list[dg.AssetCheckKey]
    upstream: list[dg.AssetKey] = field(default_factory=list)

    @classmethod
    def of(cls, repository_def: dg.RepositoryDefinition | None) -> RoundGraph:
        if repository_def is None:
            raise SelfImproveError(
                "The next-round decision needs the code location's definitions to find the "
                "blocking gates",
                "in tests, build the context with `dg.build_sensor_context(definitions=defs, ...)`",
            )
        return cls.of_graph(repository_def.asset_graph)

    @classmethod
    def of_graph(cls, graph: Any) -> RoundGraph:
        """From an asset graph (a repository's, or a job's `asset_layer.asset_graph`)."""
        keys = (key for key in graph.asset_check_keys if graph.get(key).blocking)
        blocking = sorted(keys, key=lambda key: key.to_user_string())
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
    ) -> RoundGraph:
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


def round_graph(
    context: dg.AssetExecutionContext,
    assets: Iterable[dg.AssetsDefinition] = (),
    checks: Iterable[dg.AssetChecksDefinition] = (),
) -> RoundGraph:
    """The graph a step reads the record against: its repository's when the run has one
    (the UI, the daemon); `execute_in_process` (as `selfimprove run` does) has none, so
    then the round `assets` and `checks` given, or else the run's own job's graph."""
    try:
        return RoundGraph.of(context.repository_def)
    except Exception:  # Dagster's invariant error: "No repository definition was set"
        if assets:
            return RoundGraph.from_definitions(assets, checks)
        return RoundGraph.of_graph(context.job_def.asset_layer.asset_graph)


class DagsterRecord:
    """Reads rounds from the instance's event log, once per decision (public APIs only).

    Check results are not indexed by partition in the event log's public filters, so the
    evaluations (and planned evaluations) are read once and grouped here. Events are
    ordered by timestamp: storage ids are not comparable across the per-run shards of
    a SQLite instance.
    """

    def __init__(
        self,
        instance: dg.DagsterInstance,
        graph: RoundGraph,
        chain_problem: Callable[[str], str | None] | None = None,
    ) -> None:
        """`chain_problem(round)` (the round store's) checks a recorded round's
        checkpoint chain; without it chains are taken as verified."""
        self.instance = instance
        self.graph = graph
        self.chain_problem = chain_problem
        self._seen: dict[str, RoundState] = {}

    def round(self, round_: str) -> RoundState:
        if round_ not in self._seen:
            self._seen[round_] = self._read_round(round_)
        return self._seen[round_]

    def snapshot(self) -> RecordSnapshot:
        """Every round partition's state and the unfinished round run, as plain data."""
        running = unfinished_round_runs(self.instance)
        where = running[0].tags.get(PARTITION_TAG, "a round") if running else ""
        return RecordSnapshot(
            tuple(self.round(key) for key in self.rounds()),
            f"{ROUND_JOB} is still running {where} (run {running[0].run_id[:8]})"
            if running
            else None,
        )

    def done_rounds(self) -> list[str]:
        """The rounds that are done, in round order."""
        return [key for key in self.rounds() if self.round(key).done]

    def rounds(self) -> list[str]:
        """Every round partition the instance knows, in round order."""
        return sorted(self.instance.get_dynamic_partitions(ROUNDS.name), key=round_index)

    def _read_round(self, round_: str) -> RoundState:
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
        failed, not_run = self.gates(round_)
        chain = self.chain_problem(round_) if latest is not None and self.chain_problem else None
        return RoundState(
            round_,
            materialized=latest is not None,
            failed_gates=tuple(failed),
            unrun_gates=tuple(not_run),
            newer=tuple(newer),
            has_runs=latest is not None or has_runs(self.instance, round_),
            chain_problem=chain,
        )

    def gates(self, round_: str) -> tuple[list[str], list[str]]:
        """The blocking checks whose latest result on the round is not a pass: (failed,
        planned in a run but never evaluated)."""
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
        return failed, not_run

    def resume_point(self, round_: str, steps: list[RoundStep], settings: str) -> int:
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
                run_settings(self.instance, m.run_id) == settings for m in found
            ):
                return index
            for check in (c for c in self.graph.blocking_checks if c.asset_key in step.keys):
                result = evaluated.get(check)  # (timestamp, passed) of its latest evaluation
                if result is None or result[0] < first or not result[1]:
                    return index
            floor = max(floor, *(m.timestamp for m in found))
        return len(steps)

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


# --- runs ---------------------------------------------------------------------------


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


def run_settings(instance: dg.DagsterInstance, run_id: str | None) -> str | None:
    run = instance.get_run_by_id(run_id) if run_id else None
    return None if run is None else run.tags.get(SETTINGS_TAG)


# --- resuming a round whose run failed -------------------------------------------------


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
            raise SelfImproveError(
                "the round job's steps depend on each other in a cycle",
                "remove the dependency that points back to an earlier step",
            )
        ordered.extend(sorted(ready, key=lambda s: s.name))
    return ordered


def recorded_done_rounds(context: dg.AssetExecutionContext, store: RoundStore) -> list[str]:
    """The rounds that are done, read from inside a step (`policy=best` chooses among
    these, as promotion and the sensor do)."""
    return DagsterRecord(context.instance, round_graph(context), store.chain_problem).done_rounds()
