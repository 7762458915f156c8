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
Everything here reads one loop's record (its partitions, its asset keys, its job).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import dagster as dg

from selfimprove_dagster.assets.loop import SETTINGS_KEY, Loop, Step
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.evolution import RecordSnapshot, RoundState
from selfimprove_dagster.store.storage import previous_round, round_index

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


@dataclass(frozen=True)
class RoundGraph:
    """What the record is read against: the code location's blocking checks and the
    round assets upstream of `eval_scores` (both from its asset graph, so every gate or
    table another module wires in counts, with no list to keep in sync)."""

    loop: Loop
    blocking_checks: list[dg.AssetCheckKey]
    upstream: list[dg.AssetKey] = field(default_factory=list)

    @classmethod
    def of(cls, repository_def: dg.RepositoryDefinition | None, loop: Loop) -> RoundGraph:
        if repository_def is None:
            raise SelfImproveError(
                "The next-round decision needs the code location's definitions to find the "
                "blocking gates",
                "in tests, build the context with `dg.build_sensor_context(definitions=defs, ...)`",
            )
        return cls.of_graph(repository_def.asset_graph, loop)

    @classmethod
    def of_graph(cls, graph: Any, loop: Loop) -> RoundGraph:
        """From an asset graph (a repository's, or a job's `asset_layer.asset_graph`):
        the loop's blocking checks and its round assets upstream of its eval_scores."""
        mine = [key for key in graph.asset_check_keys if key.asset_key.has_prefix([loop.name])]
        keys = (key for key in mine if graph.get(key).blocking)
        blocking = sorted(keys, key=lambda key: key.to_user_string())
        upstream: set[dg.AssetKey] = set()
        eval_scores = loop.key("eval_scores")
        todo = [eval_scores] if eval_scores in graph.materializable_asset_keys else []
        while todo:
            for parent in graph.get(todo.pop()).parent_keys:
                node = graph.get(parent) if parent in graph.materializable_asset_keys else None
                round_table = node is not None and node.partitions_def == loop.partitions
                if round_table and parent not in upstream:
                    upstream.add(parent)
                    todo.append(parent)
        return cls(loop, blocking, sorted(upstream, key=str))

    @classmethod
    def from_definitions(
        cls,
        loop: Loop,
        assets: Iterable[dg.AssetsDefinition],
        checks: Iterable[dg.AssetChecksDefinition],
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
        eval_scores = loop.key("eval_scores")
        todo = [eval_scores] if eval_scores in specs else []
        while todo:
            for dep in specs[todo.pop()].deps:
                parent = specs.get(dep.asset_key)
                round_table = parent is not None and parent.partitions_def == loop.partitions
                if round_table and dep.asset_key not in upstream:
                    upstream.add(dep.asset_key)
                    todo.append(dep.asset_key)
        ordered = sorted(blocking, key=lambda key: key.to_user_string())
        return cls(loop, ordered, sorted(upstream, key=str))


def round_graph(
    context: dg.AssetExecutionContext,
    loop: Loop,
    assets: Iterable[dg.AssetsDefinition] = (),
    checks: Iterable[dg.AssetChecksDefinition] = (),
) -> RoundGraph:
    """The graph a step reads the record against: its repository's when the run has one
    (the UI, the daemon); `execute_in_process` (as `selfimprove run` does) has none, so
    then the round `assets` and `checks` given, or else the run's own job's graph."""
    try:
        return RoundGraph.of(context.repository_def, loop)
    except Exception:  # Dagster's invariant error: "No repository definition was set"
        if assets:
            return RoundGraph.from_definitions(loop, assets, checks)
        return RoundGraph.of_graph(context.job_def.asset_layer.asset_graph, loop)


class DagsterRecord:
    """Reads one loop's rounds from the instance, once per decision (public APIs only).

    Its cost grows with the number of rounds only: per round asset, one query for its
    latest materialization of every round; for the blocking checks, one query of the
    instance's check-execution index for every check and round. Nothing reads every
    run's events (a SQLite instance keeps those in one file per run).
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
        self.loop = graph.loop
        self.chain_problem = chain_problem
        self._seen: dict[str, RoundState] = {}
        self._latest: dict[dg.AssetKey, dict[str, Any]] = {}

    def round(self, round_: str) -> RoundState:
        if round_ not in self._seen:
            self._seen[round_] = self._read_round(round_)
        return self._seen[round_]

    def snapshot(self) -> RecordSnapshot:
        """Every round partition's state and the unfinished round run, as plain data."""
        running = unfinished_round_runs(self.instance, self.loop)
        where = running[0].tags.get(PARTITION_TAG, "a round") if running else ""
        return RecordSnapshot(
            tuple(self.round(key) for key in self.rounds()),
            f"{self.loop.job_name} is still running {where} (run {running[0].run_id[:8]})"
            if running
            else None,
        )

    def done_rounds(self) -> list[str]:
        """The rounds that are done, in round order."""
        return [key for key in self.rounds() if self.round(key).done]

    def rounds(self) -> list[str]:
        """Every round partition the instance knows, in round order."""
        partitions = self.instance.get_dynamic_partitions(self.loop.partitions.name)
        return sorted(partitions, key=round_index)

    def _read_round(self, round_: str) -> RoundState:
        latest = self.latest(self.loop.key("eval_scores"), round_)
        newer = []
        if latest is not None:
            for key in self.graph.upstream:
                parent = self.latest(key, round_)
                if parent is None:
                    continue
                # Later, and from another run: tables written by the same run (e.g. the
                # eval_scores step's own eval_details) belong to this version.
                other_run = not parent.run_id or parent.run_id != latest.run_id
                if parent.timestamp > latest.timestamp and other_run:
                    newer.append(key.path[-1])
        failed, not_run = self.gates(round_)
        chain = self.chain_problem(round_) if latest is not None and self.chain_problem else None
        return RoundState(
            round_,
            materialized=latest is not None,
            failed_gates=tuple(failed),
            unrun_gates=tuple(not_run),
            newer=tuple(newer),
            has_runs=latest is not None or has_runs(self.instance, self.loop, round_),
            chain_problem=chain,
        )

    def gates(self, round_: str) -> tuple[list[str], list[str]]:
        """The blocking checks whose latest result on the round is not a pass: (failed,
        planned in a run but never evaluated)."""
        failed, not_run = [], []
        for key in self.graph.blocking_checks:
            status = self._check_status(key, round_)
            if status == "FAILED":
                failed.append(key.name)
            elif status in ("PLANNED", "SKIPPED"):
                not_run.append(key.name)
        return failed, not_run

    def resume_point(self, round_: str, steps: list[RoundStep], settings: str) -> int:
        """How many of `steps` (in run order) a new run of `round_` can take as they are, so
        it starts at `steps[n]`. A step is taken when each of its tables was materialized
        by a run with the same `settings` (each materialization records its run's),
        after the steps it reads and after the parent round's latest `eval_scores` (the
        policy it sampled from is still current), and each blocking check on its tables
        passed on that materialization. The first step that is not taken, and every step
        after it, runs again. 0: the whole round runs."""
        parent = previous_round(round_)
        eval_scores = self.loop.key("eval_scores")
        latest_parent = self.latest(eval_scores, parent) if parent else None
        floor = latest_parent.timestamp if latest_parent is not None else 0.0
        for index, step in enumerate(steps):
            found = [self.latest(key, round_) for key in step.required]
            if not found or any(m is None for m in found):
                return index
            first = min(m.timestamp for m in found)
            if first <= floor or not all(written_with(m) == settings for m in found):
                return index
            for check in (c for c in self.graph.blocking_checks if c.asset_key in step.keys):
                info = self._check_infos.get(round_, {}).get(check)
                passed = info is not None and _status(info) == "SUCCEEDED"
                if not passed or not info.is_current:  # on an older materialization
                    return index
            floor = max(floor, *(m.timestamp for m in found))
        return len(steps)

    def latest(self, key: dg.AssetKey, round_: str) -> Any:
        """The latest materialization record of `key` for the round (None: never)."""
        return self._latest_by_round(key).get(round_)

    def _latest_by_round(self, key: dg.AssetKey) -> dict[str, Any]:
        """Round -> the latest materialization record of `key`: one query for the asset
        (newest first, paged), not one per round."""
        if key not in self._latest:
            found: dict[str, Any] = {}
            cursor = None
            while True:
                result = self.instance.fetch_materializations(key, limit=1000, cursor=cursor)
                for record in result.records:
                    found.setdefault(record.partition_key, record)
                if not result.has_more:
                    break
                cursor = result.cursor
            self._latest[key] = found
        return self._latest[key]

    def _check_status(self, key: dg.AssetCheckKey, round_: str) -> str | None:
        info = self._check_infos.get(round_, {}).get(key)
        return None if info is None else _status(info)

    @cached_property
    def _check_infos(self) -> dict[str, dict[dg.AssetCheckKey, Any]]:
        """Round -> blocking check -> its latest execution (status, and whether it
        targeted the latest materialization): one indexed query for every check and
        round, not a scan of every run's events."""
        found: dict[str, dict[dg.AssetCheckKey, Any]] = {}
        if not self.graph.blocking_checks:
            return found
        storage = self.instance.event_log_storage
        for info in storage.get_asset_check_partition_info(self.graph.blocking_checks):
            if info.partition_key is not None:
                found.setdefault(info.partition_key, {})[info.check_key] = info
        return found


def _status(info: Any) -> str:
    """SUCCEEDED, FAILED, PLANNED (started, never evaluated) or SKIPPED."""
    return str(getattr(info.latest_execution_status, "value", info.latest_execution_status))


# --- runs ---------------------------------------------------------------------------


def unfinished_round_runs(
    instance: dg.DagsterInstance, loop: Loop, round_: str | None = None
) -> list[dg.DagsterRun]:
    """The loop's round runs (of one round, when given) that are queued, starting,
    running or being canceled."""
    tags = {PARTITION_TAG: round_} if round_ else None
    runs_filter = dg.RunsFilter(job_name=loop.job_name, statuses=UNFINISHED_STATUSES, tags=tags)
    return list(instance.get_runs(filters=runs_filter, limit=5))


def has_runs(instance: dg.DagsterInstance, loop: Loop, round_: str) -> bool:
    """Any run of the loop's round job ever targeted this round's partition."""
    runs_filter = dg.RunsFilter(job_name=loop.job_name, tags={PARTITION_TAG: round_})
    return bool(instance.get_run_ids(filters=runs_filter, limit=1))


def written_with(record: Any) -> str | None:
    """The settings fingerprint a materialization recorded (`assets.loop.SETTINGS_KEY`)."""
    value = record.asset_materialization.metadata.get(SETTINGS_KEY)
    return None if value is None else str(getattr(value, "value", value))


# --- resuming a round whose run failed -------------------------------------------------


@dataclass(frozen=True)
class RoundStep:
    """One op of the round job: the tables it materializes (`required`: the ones every
    run of it writes; optional tables such as `rollouts` are not) and the steps it reads."""

    name: str
    keys: tuple[dg.AssetKey, ...]
    required: tuple[dg.AssetKey, ...]
    parents: tuple[str, ...]


def round_steps(assets: Iterable[Any], loop: Loop) -> list[RoundStep]:
    """The loop's round job's steps (its partitioned assets definitions), each after the
    steps it reads: the order a run executes them in."""
    defs = [
        a
        for a in assets
        if isinstance(a, dg.AssetsDefinition) and a.partitions_def == loop.partitions
    ]
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


def recorded_done_rounds(step: Step) -> list[str]:
    """The loop's rounds that are done, read from inside a step (`policy=best` chooses
    among these, as promotion and the sensor do)."""
    graph = round_graph(step.context, step.loop)
    return DagsterRecord(step.context.instance, graph, step.store.chain_problem).done_rounds()


def check_round_order(step: Step) -> None:
    """A run started by a backfill over several rounds builds round N only on a round
    N−1 that is done as recorded (the instance runs a backfill's runs one at a time, in
    the order the backfill submits them; this refuses the rest when one fails).
    Called by the round's first step."""
    tags = step.context.run.tags
    parent = previous_round(step.round)
    if BACKFILL_TAG not in tags or parent is None:
        return
    graph = round_graph(step.context, step.loop)
    record = DagsterRecord(step.context.instance, graph, step.store.chain_problem)
    known = record.rounds()
    problem = record.round(parent).problem() if parent in known else f"{parent} never ran"
    if problem is not None:
        raise SelfImproveError(
            f"Backfill {tags[BACKFILL_TAG]} reached {step.round} but its parent {parent} "
            f"is not done ({problem})",
            f"fix and re-run {parent} first, then backfill from {step.round}; or run "
            f"`selfimprove run --loop {step.loop.name} --rounds {round_index(step.round) + 1}`, "
            "which runs rounds in order",
        )
