"""Where a round's artifacts live, published as versions, and the DuckDB catalog over them.

Layout under the data dir (default `./var`):

    rounds/<round>/<step>/<version>/<table>.parquet   one folder per materialization
    rounds/<round>/<step>/current.json                the current version of that step
    checkpoints/<round> -> <round>@<version>/         LoRA adapter + tokenizer + manifest
    models/                            converted embedded models (keyed by GGUF sha256)
    current/<table>/round=<round>/<table>.parquet -> the current file (relative links)
    catalog.duckdb                     views over those links (`catalog`)
    dagster_home/                      the persistent Dagster instance (UI + CLI)

A step (one Dagster op) writes all its tables as one version (`STEP_TABLES`): a table
the step did not write in its latest materialization is not current, even if an
older version has it. Old versions stay until `RoundStore.collect_garbage`
(`selfimprove gc`). `versions` does the atomic publishing; tables that define
generation ids (`ID_TABLES`) get an id index beside them, so lineage finds an id's
round without scanning every round. Nothing under the data dir names its absolute
path: pointers hold version names, links are relative, and the catalog's views read
from wherever the data dir is opened (`catalog`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.models import checkpoint_problem, is_checkpoint
from selfimprove_dagster.store import catalog, versions
from selfimprove_dagster.store.versions import TableVersion

ROUND_PATTERN = re.compile(r"^round_(\d{3,})$")
# The tables each step (one Dagster op, a multi asset) publishes together. The first
# table is the one every recipe writes; the others only some recipes write.
STEP_TABLES: dict[str, tuple[str, ...]] = {
    "prompts": ("prompts", "prompt_mix", "prompt_candidates", "curriculum_measure"),
    "generations": ("generations",),
    "critiques": ("critiques", "refinements"),
    "filtered": ("filtered",),
    "checkpoint": ("checkpoints", "rollouts", "rl_steps"),  # the last two: grpo/rloo
    "eval_scores": ("eval_scores", "eval_details"),
}
TABLE_STEP = {table: step for step, tables in STEP_TABLES.items() for table in tables}
# Per-round tables that get a catalog view across rounds.
CATALOG_TABLES = tuple(TABLE_STEP)
# Tables whose rows define a generation id (the others carry the id of one of these, in
# the same round: ids hash their round). Each version of them gets an id index.
ID_COLUMN = "generation_id"
ID_TABLES = ("generations", "refinements", "rollouts")


def step_of(table: str) -> str:
    """The step that writes `table` (an unknown table is its own step)."""
    return TABLE_STEP.get(table, table)


def round_key(index: int) -> str:
    return f"round_{index:03d}"


def round_index(key: str) -> int:
    match = ROUND_PATTERN.match(key)
    if not match:
        raise SelfImproveError(
            f"`{key}` is not a round partition key", "use keys like round_000, round_001, ..."
        )
    return int(match.group(1))


def previous_round(key: str) -> str | None:
    index = round_index(key)
    return round_key(index - 1) if index > 0 else None


def checkpoint_round(ref: str) -> str | None:
    """The round a checkpoint reference names (`.../round_004` or `.../round_004@<version>`)."""
    match = re.match(r"^(round_\d{3,})(@.*)?$", Path(ref).name)
    return match.group(1) if match else None


@dataclass(frozen=True)
class RoundStore:
    """Paths, versioned publishing and reads of round artifacts under `data_dir`."""

    data_dir: Path
    # Checkpoint-chain verdicts by published version folder (`chain_problem`): each
    # link of a chain is verified once per store, however many rounds build on it.
    _chains: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.duckdb"

    @property
    def rounds_dir(self) -> Path:
        return self.data_dir / "rounds"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def promoted_path(self) -> Path:
        return self.data_dir / "promoted_policy.parquet"

    def plot_path(self, name: str) -> Path:
        return self.data_dir / "plots" / name

    # --- tables ------------------------------------------------------------------------

    def _step_dir(self, round_: str, step: str) -> Path:
        round_index(round_)  # a key like "../x" must never become a path
        return self.rounds_dir / round_ / step

    def _legacy_path(self, round_: str, table: str) -> Path:
        """Where a table lived before versions (read while its step has none)."""
        return self.rounds_dir / round_ / f"{table}.parquet"

    def current(self, round_: str, step: str) -> TableVersion | None:
        """The current version of `step`'s tables for `round_` (None: never published)."""
        return versions.current_tables(self._step_dir(round_, step))

    def publish(
        self,
        round_: str,
        step: str,
        frames: dict[str, pl.DataFrame],
        run_id: str | None = None,
    ) -> TableVersion:
        """Publish `frames` as the new current version of `step` for `round_`: all of
        them become current at once, and tables of `step` not in `frames` stop being
        current. Atomic: a kill at any instant leaves the old set or the new one."""
        unknown = set(frames) - set(STEP_TABLES.get(step, (step,)))
        if unknown:
            raise ValueError(f"step `{step}` does not write tables {sorted(unknown)}")
        published = versions.publish_tables(
            self._step_dir(round_, step),
            frames,
            run_id,
            index_columns={table: ID_COLUMN for table in ID_TABLES},
        )
        self._link_step(round_, step, published)
        return published

    def _link_step(self, round_: str, step: str, current: TableVersion | None) -> None:
        """Point the catalog's links of `step`'s tables for `round_` at `current` (a
        table it does not hold: at the legacy file, or no link)."""
        for table in dict.fromkeys(
            (*STEP_TABLES.get(step, (step,)), *(current.tables if current else ()))
        ):
            if current is not None:
                target = current.path(table) if table in current.tables else None
            else:
                legacy = self._legacy_path(round_, table)
                target = legacy if legacy.is_file() else None
            catalog.link_table(self.data_dir, table, round_, target)

    def write(self, round_: str, table: str, frame: pl.DataFrame) -> Path:
        """Replace one table: a new version of its step holding `frame` and the step's
        other current tables (tests and repairs; assets publish whole sets)."""
        step = step_of(table)
        current = self.current(round_, step)
        frames = {
            name: self.read(round_, name)
            for name in (current.tables if current else {})
            if name != table
        }
        return self.publish(round_, step, {table: frame, **frames}).path(table)

    def table_path(self, round_: str, table: str) -> Path | None:
        """The file of `table`'s current version for `round_`, or None."""
        current = self.current(round_, step_of(table))
        if current is not None:
            return current.path(table) if table in current.tables else None
        legacy = self._legacy_path(round_, table)
        return legacy if legacy.is_file() else None

    def row_count(self, round_: str, table: str) -> int | None:
        """Rows of `table`'s current version, from its step's pointer (no table read;
        None: not current)."""
        current = self.current(round_, step_of(table))
        if current is not None:
            return current.row_counts.get(table) if table in current.tables else None
        path = self.table_path(round_, table)
        return None if path is None else pl.scan_parquet(path).select(pl.len()).collect().item()

    def first_value(self, round_: str, table: str, column: str):
        """`column` of the first row of `table` (one column of one row group read; None:
        no such table, column or row)."""
        path = self.table_path(round_, table)
        if path is None:
            return None
        scan = pl.scan_parquet(path)
        if column not in scan.collect_schema().names():
            return None
        first = scan.select(column).head(1).collect()
        return first.item() if first.height else None

    def table_uri(self, round_: str, table: str) -> str | None:
        path = self.table_path(round_, table)
        return str(path.resolve()) if path else None

    def index_path(self, round_: str, table: str) -> Path | None:
        """The id index of `table`'s current version for `round_` (None: none, e.g. a
        version published before indexes, or a table without ids)."""
        current = self.current(round_, step_of(table))
        if current is None or table not in current.tables:
            return None
        return current.index_path(table)

    def rounds_holding(self, table: str, generation_id: str) -> list[str]:
        """Rounds whose current `table` may hold `generation_id`, in order: the id
        indexes say "maybe" (a false maybe for about one id in 4,000 per million rows),
        and a round without an index is always a candidate. A few bytes per round."""
        found = []
        for round_ in self.round_keys():
            current = self.current(round_, step_of(table))
            if current is None:
                if self._legacy_path(round_, table).is_file():
                    found.append(round_)
                continue
            if table not in current.tables:
                continue
            index = current.index_path(table)
            if (
                index is None
                or not index.is_file()
                or versions.index_may_hold(index, generation_id)
            ):
                found.append(round_)
        return found

    def read(self, round_: str, table: str) -> pl.DataFrame:
        path = self.table_path(round_, table)
        if path is None or not path.is_file():
            raise SelfImproveError(
                f"{round_} has no current `{table}` table",
                f"materialize `{table}` for {round_} first (the round job does all its steps)",
            )
        try:
            return pl.read_parquet(path)
        except Exception as error:  # polars raises several types for a damaged file
            reason = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
            raise SelfImproveError(
                f"{round_}'s `{table}` table ({path}) is not a readable Parquet file: {reason}",
                f"re-materialize `{step_of(table)}` for {round_} (it writes a new version)",
            ) from None

    def has(self, round_: str, table: str) -> bool:
        path = self.table_path(round_, table)
        return path is not None and path.is_file()

    def data_version(self, round_: str, table: str) -> str | None:
        """Content hash (sha256 of the Parquet file) of `table`'s current version."""
        current = self.current(round_, step_of(table))
        if current is None or table not in current.table_hashes:
            return None
        return current.table_hashes[table]

    @classmethod
    def at(cls, data_dir: str | Path) -> RoundStore:
        """The round store of a data dir given as a setting (relative: to the working dir)."""
        return cls(Path(data_dir).expanduser().resolve())

    def write_promoted(self, frame: pl.DataFrame) -> Path:
        """The promoted-policy record (one row), replaced atomically."""
        return self._replace_file(self.promoted_path, frame)

    @property
    def experiments_path(self) -> Path:
        return self.data_dir / "experiments.parquet"

    def write_experiments(self, frame: pl.DataFrame) -> Path:
        """Every loop's rounds side by side (the `experiments` asset), replaced atomically."""
        return self._replace_file(self.experiments_path, frame)

    def _replace_file(self, path: Path, frame: pl.DataFrame) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(versions.temp_name(path.name))
        frame.write_parquet(tmp)
        os.replace(tmp, path)
        return path

    # --- checkpoints ---------------------------------------------------------------------

    def checkpoint_dir(self, round_: str) -> Path:
        """The stable path of `round_`'s checkpoint (a link to its current version)."""
        round_index(round_)
        return self.checkpoints_dir / round_

    def checkpoint_ref(self, round_: str) -> str:
        """The model reference of `round_`'s checkpoint: its stable absolute path, so a
        later round names "the current checkpoint of round N", whose identity the
        manifest chain then verifies."""
        return os.path.abspath(self.checkpoint_dir(round_))

    def checkpoint_version_dir(self, round_: str) -> Path | None:
        """The folder of the current checkpoint version of `round_` (None: none yet)."""
        return versions.current_dir(self.checkpoint_dir(round_))

    def checkpoint_staging(self, round_: str) -> Path:
        """A fresh temporary folder to train `round_`'s checkpoint into (publish it with
        `publish_checkpoint`); unique per writer, so two runs never share one."""
        return versions.staging_dir(self.checkpoint_dir(round_))

    def publish_checkpoint(self, round_: str, staging: Path, run_id: str | None = None) -> Path:
        """Make the complete folder `staging` the current checkpoint of `round_`."""
        return versions.publish_dir(staging, self.checkpoint_dir(round_), run_id)

    def has_checkpoint(self, round_: str) -> bool:
        return is_checkpoint(self.checkpoint_dir(round_))

    def chain_problem(self, round_: str) -> str | None:
        """None when the checkpoint chain of `round_` verifies (each adapter, parent and
        base model unchanged since it was trained on); otherwise a one-line reason."""
        if not self.has_checkpoint(round_):
            return f"{round_} has no checkpoint"
        return checkpoint_problem(self.checkpoint_dir(round_), self.models_dir, self._chains)

    def policy_for(self, round_: str, base_model: str) -> tuple[str, str | None]:
        """The model that generates in `round_`: round N−1's checkpoint, or the base model.

        Dagster has no previous-partition mapping for dynamic partitions, so round N
        reads round N−1 explicitly here and refuses to run on a missing checkpoint.
        Returns (policy model reference, parent round or None).
        """
        parent = previous_round(round_)
        if parent is None:
            return base_model, None
        if not self.has_checkpoint(parent):
            raise SelfImproveError(
                f"{round_} needs the checkpoint of {parent} as its policy, but {parent} has no "
                f"checkpoint at {self.checkpoint_dir(parent)}",
                f"materialize {parent} first (e.g. `selfimprove run --rounds "
                f"{round_index(round_)}`), or start from round_000",
            )
        return self.checkpoint_ref(parent), parent

    def generation_policy(self, round_: str) -> tuple[str, str | None]:
        """The policy that generated `round_` (recorded in its `generations` table), and
        the round whose checkpoint it is (None for a model outside the data dir)."""
        policy = self.read(round_, "generations")["policy"][0]
        path = Path(policy)
        in_store = os.path.abspath(path.parent) == os.path.abspath(self.checkpoints_dir) or (
            path.parent == self.checkpoints_dir.resolve()
        )
        return policy, checkpoint_round(policy) if in_store else None

    # --- rounds --------------------------------------------------------------------------

    def round_keys(self) -> list[str]:
        """Rounds with a folder under `rounds/`, in order."""
        if not self.rounds_dir.is_dir():
            return []
        return sorted(p.name for p in self.rounds_dir.iterdir() if ROUND_PATTERN.match(p.name))

    def eval_history(self, rounds: Iterable[str]) -> pl.DataFrame:
        """The `eval_scores` rows of `rounds`, in round order. Which rounds are done is
        Dagster's record (`evolution.RoundState.done`), never a file's existence: pass
        the done rounds."""
        frames = [self.read(key, "eval_scores") for key in sorted(set(rounds), key=round_index)]
        return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()

    # --- garbage collection --------------------------------------------------------------

    def collect_garbage(self, dry_run: bool = False) -> list[Path]:
        """Delete what no reader can see: non-current table versions, non-current
        checkpoint versions, legacy per-round files of steps that have versions, and
        temporary folders (and catalog links) whose writer is gone. Returns the paths
        (deleted, or with `dry_run`, that would be). The catalog's links are resynced
        first and its views refreshed afterwards."""
        stale: list[Path] = []
        for round_ in self.round_keys():
            round_dir = self.rounds_dir / round_
            for step_dir in sorted(p for p in round_dir.iterdir() if p.is_dir()):
                stale += versions.stale_table_versions(step_dir)
            for legacy in sorted(round_dir.glob("*.parquet")):
                if self.current(round_, step_of(legacy.stem)) is not None:
                    stale.append(legacy)
        stale += versions.stale_dir_versions(self.checkpoints_dir)
        stale += catalog.abandoned_links(self.data_dir)
        if not dry_run:
            self.sync_catalog()  # no link may name a version about to go
            versions.remove(stale)
            self.refresh_catalog()
        return stale

    # --- catalog -------------------------------------------------------------------------

    def current_files(self, table: str) -> list[Path]:
        """The current file of `table` in every round that has one, in round order."""
        paths = (self.table_path(round_, table) for round_ in self.round_keys())
        return [p.resolve() for p in paths if p is not None and p.is_file()]

    def sync_catalog(self) -> None:
        """Resync every catalog link with the rounds' pointers (the repair path: a kill
        between a pointer swap and its link swaps, a round folder deleted by hand, a
        data dir from before the links). Reads every round's pointers."""
        rounds = set(self.round_keys())
        for table in CATALOG_TABLES:
            for round_ in catalog.linked_rounds(self.data_dir, table).keys() - rounds:
                catalog.link_table(self.data_dir, table, round_, None)
        for round_ in sorted(rounds):
            for step in STEP_TABLES:
                self._link_step(round_, step, self.current(round_, step))

    def refresh_catalog(self, rebuild: bool = False) -> str:
        """Make the catalog's views match its links: one DuckDB view per table, over the
        current version of every round (see `catalog`).

        Each publish keeps the links current itself, so this only creates the view of a
        table seen for the first time: its cost does not grow with the rounds. A
        catalog from another layout or another place (a copied or moved data dir), or
        `rebuild`, resyncs every link first and rebuilds every view. A catalog locked by
        another process (someone writing to it) is left as is: the rounds' current
        versions are the source of truth, and the next refresh catches up.
        """
        import duckdb

        try:
            views = catalog.existing_views(self.data_dir)
        except duckdb.IOException as error:
            return f"catalog not refreshed (in use by another process: {error})"
        if rebuild or not catalog.is_current(self.data_dir, views):
            self.sync_catalog()
            rebuild = True
        return catalog.refresh(self.data_dir, CATALOG_TABLES, rebuild=rebuild)

    def connect_catalog(self, memory_limit: str = catalog.DEFAULT_MEMORY_LIMIT):
        """A read-only DuckDB connection to the catalog, reading this data dir's files
        with bounded memory (`catalog.connect`)."""
        return catalog.connect(self.data_dir, memory_limit)
