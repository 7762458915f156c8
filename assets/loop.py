"""One self-improvement loop's names and settings, as its assets see them.

Every Dagster object of a loop carries the loop's name, so several loops live in one
deployment without sharing anything (dynamic partitions with one name would silently
share one partition set in an instance; duplicate asset or resource keys would clash):

    partitions   <loop>_rounds                 asset keys   <loop>/<table>
    round job    <loop>_round_job              resources    <loop>_<group>
    sensors      <loop>_next_round_sensor ...  group        <loop>

`Loop.step(context)` is what an asset body starts with: the round, the round store,
the settings the run resolved (YAML, environment, run config), their fingerprint and
the readable list of what differs from the defaults, and the table helpers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import dagster as dg
import polars as pl

from selfimprove_dagster.assets.tables import table_schema
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.locking import check_round_free
from selfimprove_dagster.resources.settings import GROUPS, settings_changes, settings_fingerprint
from selfimprove_dagster.store.storage import RoundStore
from selfimprove_dagster.store.versions import TableVersion

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# Metadata on every round table: the fingerprint of the settings that wrote it (resume
# reuses a table only when the new run's settings have the same), and what they change.
SETTINGS_KEY = "selfimprove/settings"
CHANGES_KEY = "selfimprove/settings_changed"
LOOP_TAG = "selfimprove/loop"


def check_loop_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise SelfImproveError(
            f"Loop name {name!r} cannot name Dagster objects",
            "use lowercase letters, digits and underscores, starting with a letter "
            "(at most 40 characters), e.g. `add2_star`",
        )
    return name


@dataclass(frozen=True)
class LoopSpec:
    """A loop: its name and its resolved settings (one resource per group)."""

    name: str
    resources: Mapping[str, dg.ConfigurableResource]  # group -> resource
    description: str = ""
    env_prefix: str = ""

    def __post_init__(self) -> None:
        check_loop_name(self.name)
        missing = set(GROUPS) - set(self.resources)
        if missing:
            raise SelfImproveError(
                f"Loop `{self.name}` has no settings for {sorted(missing)}",
                "build it with resources.settings.resolve_settings",
            )


@dataclass(frozen=True)
class Loop:
    """The names of one loop's Dagster objects, derived from its name alone (so the
    record of a loop can be read knowing only its name), and its spec when built."""

    name: str
    spec: LoopSpec | None = None
    partitions: dg.DynamicPartitionsDefinition = field(init=False, compare=False)

    def __post_init__(self) -> None:
        check_loop_name(self.name)
        object.__setattr__(
            self, "partitions", dg.DynamicPartitionsDefinition(name=f"{self.name}_rounds")
        )

    @classmethod
    def of(cls, spec: LoopSpec) -> Loop:
        return cls(spec.name, spec)

    @property
    def job_name(self) -> str:
        return f"{self.name}_round_job"

    @property
    def policy_job_name(self) -> str:
        return f"{self.name}_policy_job"

    def key(self, table: str) -> dg.AssetKey:
        return dg.AssetKey([self.name, table])

    def keys(self, *tables: str) -> list[dg.AssetKey]:
        return [self.key(t) for t in tables]

    def resource_key(self, group: str) -> str:
        return f"{self.name}_{group}"

    def resource_keys(self, *groups: str) -> set[str]:
        return {self.resource_key(g) for g in (groups or GROUPS)}

    def resources(self) -> dict[str, dg.ConfigurableResource]:
        """The loop's resources under its own keys (for `dg.Definitions`)."""
        return {self.resource_key(g): r for g, r in self.spec.resources.items()}

    def settings(self, context: Any) -> Settings:
        """The settings this run resolved: the loop's resources as the run sees them
        (run config over the loop's YAML and environment)."""
        resources = {
            g: getattr(context.resources, self.resource_key(g))
            for g in GROUPS
            if hasattr(context.resources, self.resource_key(g))
        }
        return Settings(resources, self.spec)

    def step(self, context: dg.AssetExecutionContext) -> Step:
        return Step(self, context)


def tidy(metadata: Mapping) -> dict:
    """Metadata as a person reads it: floats to 4 significant digits (0.44, not
    0.43999999999999995)."""
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in metadata.items()}


class Settings:
    """A run's resolved settings by group: `settings.task`, `settings.generator`, ..."""

    def __init__(self, resources: Mapping[str, Any], spec: LoopSpec | None) -> None:
        self.by_group = dict(resources)
        self.spec = spec
        for group, resource in resources.items():
            setattr(self, group, resource)

    @cached_property
    def fingerprint(self) -> str:
        return settings_fingerprint(self.by_group)

    @cached_property
    def changes(self) -> list[str]:
        return settings_changes(self.by_group, self.spec.resources if self.spec else None)


class Step:
    """What an asset body of a loop works with: its round, its store, its settings, and
    the helpers that publish tables and describe them to Dagster."""

    def __init__(self, loop: Loop, context: dg.AssetExecutionContext) -> None:
        self.loop = loop
        self.context = context
        self.round = context.partition_key
        self.settings = loop.settings(context)
        self.store: RoundStore = self.settings.storage.store()
        self.log = context.log.info
        # One writer per round: a step of a run launched while another process holds
        # the round (`selfimprove run`) stops here, before it reads or writes anything.
        run_id = getattr(context, "run_id", None) or context.op_execution_context.run_id
        holder = f"run {run_id[:8]} of {loop.job_name}"
        check_round_free(self.store.data_dir, loop.name, self.round, holder)

    def save(self, step: str, frames: Mapping[str, pl.DataFrame | None]) -> TableVersion:
        """Publish the step's tables as one new version of the round (a None frame: not
        written this time, so that table is no longer current) and refresh the catalog."""
        written = {table: frame for table, frame in frames.items() if frame is not None}
        version = self.store.publish(self.round, step, written, run_id=self.context.run_id)
        self.log(f"{self.loop.name} {self.round}: {step} version {version.version}: "
                 f"{', '.join(written)}")  # fmt: skip
        self.log(self.store.refresh_catalog())
        return version

    def settings_metadata(self) -> dict:
        return {
            SETTINGS_KEY: self.settings.fingerprint,
            CHANGES_KEY: dg.MetadataValue.md(
                "\n".join(f"- {line}" for line in self.settings.changes) or "(all defaults)"
            ),
        }

    def result(
        self, version: TableVersion, table: str, metadata: Mapping | None = None
    ) -> dg.MaterializeResult:
        """A table's materialization: row count, DuckDB view, Parquet location of the
        current version, column schema, the settings that wrote it, and its content hash
        as the Dagster data version (downstream shows stale only when content changed)."""
        return dg.MaterializeResult(
            asset_key=self.loop.key(table),
            metadata={
                "dagster/row_count": version.row_counts[table],
                "dagster/table_name": table,
                "dagster/uri": str(version.path(table).resolve()),
                "dagster/column_schema": table_schema(table),
                "version": version.version,
                **self.settings_metadata(),
                **tidy(metadata or {}),
            },
            data_version=dg.DataVersion(version.table_hashes[table]),
        )

    def side_results(self, version: TableVersion, *tables: str) -> Iterator[dg.MaterializeResult]:
        """Results for those of `tables` written in `version` (a skipped one: none)."""
        for table in tables:
            if table in version.tables:
                yield self.result(version, table)
