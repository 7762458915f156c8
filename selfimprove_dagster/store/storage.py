"""Where a round's artifacts live, written atomically, and the DuckDB catalog over them.

Layout under the data dir (default `./var`):

    rounds/<round>/<asset>.parquet     one file per asset and round
    checkpoints/<round>/               LoRA adapter + tokenizer + manifest.json
    models/                            converted embedded models (keyed by GGUF sha256)
    catalog.duckdb                     views over all rounds: generations, critiques, ...
    dagster_home/                      the persistent Dagster instance (UI + CLI)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.models import is_checkpoint

ROUND_PATTERN = re.compile(r"^round_(\d{3,})$")
# Per-round tables that get a catalog view across rounds.
CATALOG_TABLES = (
    "prompts",
    "prompt_candidates",
    "prompt_mix",
    "curriculum_measure",
    "generations",
    "critiques",
    "refinements",
    "filtered",
    "checkpoints",
    "eval_scores",
    "eval_details",
)


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


def _write_atomic(path: Path, frame: pl.DataFrame) -> Path:
    """Write to a temporary file and rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class RoundStore:
    """Paths and atomic reads/writes for round artifacts under `data_dir`."""

    data_dir: Path

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.duckdb"

    def table_path(self, round_: str, table: str) -> Path:
        return self.data_dir / "rounds" / round_ / f"{table}.parquet"

    def checkpoint_dir(self, round_: str) -> Path:
        return self.data_dir / "checkpoints" / round_

    @property
    def promoted_path(self) -> Path:
        return self.data_dir / "promoted_policy.parquet"

    def write(self, round_: str, table: str, frame: pl.DataFrame) -> Path:
        """Write a round's table atomically (temporary file, then rename)."""
        return _write_atomic(self.table_path(round_, table), frame)

    def write_promoted(self, frame: pl.DataFrame) -> Path:
        """The promoted-policy record (one row), replaced atomically."""
        return _write_atomic(self.promoted_path, frame)

    def read(self, round_: str, table: str) -> pl.DataFrame:
        path = self.table_path(round_, table)
        if not path.is_file():
            raise SelfImproveError(
                f"{round_} has no `{table}` table at {path}",
                f"materialize `{table}` for {round_} first (the round job does all its steps)",
            )
        return pl.read_parquet(path)

    def has(self, round_: str, table: str) -> bool:
        return self.table_path(round_, table).is_file()

    def has_checkpoint(self, round_: str) -> bool:
        return is_checkpoint(self.checkpoint_dir(round_))

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
        return str(self.checkpoint_dir(parent).resolve()), parent

    def generation_policy(self, round_: str) -> tuple[str, str | None]:
        """The policy that generated `round_` (recorded in its `generations` table), and
        the round whose checkpoint it is (None for a model outside the data dir)."""
        policy = self.read(round_, "generations")["policy"][0]
        path = Path(policy)
        in_store = path.parent == (self.data_dir / "checkpoints").resolve()
        return policy, path.name if in_store else None

    def completed_rounds(self) -> list[str]:
        """Rounds whose last asset (`eval_scores`) is written, in order."""
        rounds_dir = self.data_dir / "rounds"
        if not rounds_dir.is_dir():
            return []
        keys = [p.name for p in rounds_dir.iterdir() if ROUND_PATTERN.match(p.name)]
        return sorted(k for k in keys if self.has(k, "eval_scores"))

    def history(self) -> pl.DataFrame:
        """All completed rounds' `eval_scores` rows, in round order."""
        frames = [self.read(key, "eval_scores") for key in self.completed_rounds()]
        return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()

    def refresh_catalog(self) -> str:
        """(Re)create one DuckDB view per table over all rounds' Parquet files.

        Views read a glob (`rounds/*/<table>.parquet`), so later rounds show up without
        a refresh; this only has to run when a table gets its first file. A catalog
        locked by another process (someone querying it) is left as is: the round's
        Parquet files are the source of truth, and the next refresh catches up.
        """
        import duckdb

        self.data_dir.mkdir(parents=True, exist_ok=True)
        rounds_dir = (self.data_dir / "rounds").resolve()
        try:
            con = duckdb.connect(str(self.catalog_path))
        except duckdb.IOException as error:
            return f"catalog not refreshed (in use by another process: {error})"
        with con:
            for table in CATALOG_TABLES:
                if any(rounds_dir.glob(f"round_*/{table}.parquet")):
                    pattern = f"{rounds_dir}/round_*/{table}.parquet"
                    con.execute(
                        f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM "
                        f"read_parquet('{pattern}', union_by_name = true)"
                    )
                else:
                    con.execute(f"DROP VIEW IF EXISTS {table}")
            if self.promoted_path.is_file():
                con.execute(
                    "CREATE OR REPLACE VIEW promoted_policy AS SELECT * FROM "
                    f"read_parquet('{self.promoted_path.resolve()}')"
                )
        return f"catalog refreshed: {self.catalog_path}"
