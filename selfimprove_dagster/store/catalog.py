"""The DuckDB catalog of a data dir: one view per round table, across every round.

    con = catalog.connect(data_dir)     # bounded memory, spills to <data_dir>/duckdb_tmp
    con.sql("SELECT round, count(*) FROM generations GROUP BY round")

What the views read is a folder of links that `RoundStore.publish` keeps current:

    current/<table>/round=<round>/<table>.parquet
        -> ../../../rounds/<round>/<step>/<version>/<table>.parquet

one relative symlink per round and table, swapped with one rename at every publish
(and removed when the step's latest version did not write the table). So:

- a view is a glob over those links and never lists files: adding round 100 changes
  no view, and the refresh after a publish costs the same at round 100 as at round 1
  (it only creates the view of a table that appears for the first time);
- the folder is Hive-style: DuckDB skips every other round's file for
  `WHERE round = 'round_042'` before opening it (`round` is also a column of the files);
- nothing depends on where the data dir is: the links are relative, and the views read
  `coalesce(getvariable('selfimprove_data_dir'), '<the dir they were built in>')`.
  `connect` sets that variable to the data dir it opens, so a copied or moved data dir
  answers from its own files; a plain `duckdb.connect(".../catalog.duckdb")` reads
  where the catalog was last refreshed (any publish or `selfimprove gc` in the new
  place rewrites that), or wherever `SET VARIABLE selfimprove_data_dir = '...'` says.

DuckDB settings do not live in the database file: `connect` sets the memory limit
(`DEFAULT_MEMORY_LIMIT`), the threads and a temporary directory inside the data dir,
so a join larger than the limit spills to disk instead of failing or swapping.

Nothing here knows about steps or rounds' meaning; `storage.RoundStore` decides what to
link. The rounds' pointers stay the source of truth: a kill between a step's pointer
swap and its link swaps leaves the catalog on the step's previous version until the
step publishes again or `selfimprove gc` resyncs every link (`RoundStore.sync_catalog`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.store import versions

CATALOG_FILE = "catalog.duckdb"
LINKS_DIR = "current"  # current/<table>/round=<round>/<table>.parquet
TEMP_DIR = "duckdb_tmp"  # where a connection spills what does not fit its memory limit
ROOT_VARIABLE = "selfimprove_data_dir"
# Written as each view's comment: a view built by another layout, or in another data dir,
# is rebuilt at the next refresh.
SIGNATURE = "selfimprove catalog v2"
# Enough for the documented queries at 1M rows a round; bigger joins spill to TEMP_DIR.
DEFAULT_MEMORY_LIMIT = "1GB"
# Single files with a view of their own (no rounds): view name -> file under the data dir.
SINGLE_FILES = {
    "promoted_policy": "promoted_policy.parquet",
    "experiments": "experiments.parquet",  # every loop's rounds (assets/experiments.py)
}
LOCK_RETRY_S = 2.0  # how long `connect` waits for a refresh that holds the file


def link_path(data_dir: Path, table: str, round_: str) -> Path:
    """Where the link to `table`'s current file of `round_` lives."""
    return Path(data_dir) / LINKS_DIR / table / f"round={round_}" / f"{table}.parquet"


def link_table(data_dir: Path, table: str, round_: str, target: Path | None) -> None:
    """Point the catalog's link for (`table`, `round_`) at `target` (a file under the
    data dir), or remove it (None: the round has no current `table`)."""
    link = link_path(data_dir, table, round_)
    if target is None:
        if os.path.lexists(link):
            link.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # so `linked_tables` stays one listing
                link.parent.rmdir()
        return
    relative = os.path.relpath(os.path.abspath(target), os.path.abspath(link.parent))
    if os.path.islink(link) and os.readlink(link) == relative:
        return
    versions.replace_link_atomic(link, relative)


def linked_rounds(data_dir: Path, table: str) -> dict[str, str]:
    """{round: link target} of every link of `table` (a full listing: for resyncs)."""
    folder = Path(data_dir) / LINKS_DIR / table
    if not folder.is_dir():
        return {}
    found = {}
    for entry in os.scandir(folder):
        link = Path(entry.path) / f"{table}.parquet"
        if entry.name.startswith("round=") and os.path.islink(link):
            found[entry.name.removeprefix("round=")] = os.readlink(link)
    return found


def abandoned_links(data_dir: Path) -> list[Path]:
    """Temporary links left by writers that died mid-swap (for `collect_garbage`)."""
    folder = Path(data_dir) / LINKS_DIR
    if not folder.is_dir():
        return []
    return [
        temp
        for table_dir in sorted(p for p in folder.iterdir() if p.is_dir())
        for round_dir in sorted(p for p in table_dir.iterdir() if p.is_dir())
        for temp in versions.abandoned_temps(round_dir)
    ]


def linked_tables(data_dir: Path) -> set[str]:
    """Tables with at least one link (a view over them has files to read)."""
    folder = Path(data_dir) / LINKS_DIR
    if not folder.is_dir():
        return set()
    return {entry.name for entry in os.scandir(folder) if entry.is_dir() and _has_link(entry)}


def _has_link(table_dir: os.DirEntry) -> bool:
    for entry in os.scandir(table_dir.path):
        if os.path.lexists(os.path.join(entry.path, f"{table_dir.name}.parquet")):
            return True
    return False


def literal(text: str) -> str:
    """`text` as a SQL string literal. Values are inlined, never bound as parameters:
    DuckDB's Python client imports pandas and pyarrow (~0.6 s) on the first bound
    parameter, more than a lineage query takes."""
    return "'" + str(text).replace("'", "''") + "'"


def view_sql(data_dir: Path, view: str) -> str:
    """The SELECT of `view`: a glob over its links (Hive `round=` partitions), or its
    single file, under the data dir the connection names (see the module docstring)."""
    root = f"coalesce(getvariable('{ROOT_VARIABLE}'), {literal(str(Path(data_dir).resolve()))})"
    if view in SINGLE_FILES:
        return f"SELECT * FROM read_parquet({root} || '/{SINGLE_FILES[view]}')"
    pattern = f"/{LINKS_DIR}/{view}/*/{view}.parquet"
    return (
        f"SELECT * FROM read_parquet({root} || {literal(pattern)}, hive_partitioning = true, "
        "hive_types = {'round': VARCHAR}, union_by_name = true)"
    )


def _comment(data_dir: Path) -> str:
    return f"{SIGNATURE} {Path(data_dir).resolve()}"


def wanted_views(data_dir: Path, tables: Iterable[str]) -> set[str]:
    """Of `tables`, those with files to read, plus the single files that exist."""
    wanted = set(tables) & linked_tables(data_dir)
    wanted |= {view for view, name in SINGLE_FILES.items() if (Path(data_dir) / name).is_file()}
    return wanted


def existing_views(data_dir: Path) -> dict[str, str] | None:
    """{view: comment} of the catalog (None: no catalog file). Opens it read-only, so
    a user's read-only session does not block it; raises duckdb.IOException while
    another process holds it for writing."""
    import duckdb

    path = Path(data_dir) / CATALOG_FILE
    if not path.is_file():
        return None
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute(
            "SELECT view_name, coalesce(comment, '') FROM duckdb_views() WHERE NOT internal"
        ).fetchall()
    return dict(rows)


def is_current(data_dir: Path, views: dict[str, str] | None) -> bool:
    """Whether catalog views (`existing_views`) were built by this layout for this data
    dir: otherwise every link is resynced and every view rebuilt."""
    if views is None:
        return False
    ours = [comment for comment in views.values() if comment.startswith(SIGNATURE)]
    return bool(ours) and all(comment == _comment(data_dir) for comment in ours)


def refresh(data_dir: Path, tables: Iterable[str], rebuild: bool = False) -> str:
    """Create the views `tables` need and drop those with nothing left to read.

    Cheap when nothing changed (the usual publish: a new round adds links, not views):
    one read-only look at the catalog, no write. A catalog locked by another process is
    left as is: the rounds' current versions are the source of truth, and the next
    refresh catches up. `rebuild` replaces every view (another layout, another place).
    """
    import duckdb

    data_dir = Path(data_dir)
    tables = set(tables) | set(SINGLE_FILES)
    wanted = wanted_views(data_dir, tables)
    try:
        views = existing_views(data_dir)
    except duckdb.IOException as error:
        return f"catalog not refreshed (in use by another process: {error})"
    rebuild = rebuild or not is_current(data_dir, views)
    have = set(views or {})
    create = wanted if rebuild else wanted - have
    drop = (have & tables) - wanted
    if not create and not drop:
        return f"catalog up to date: {data_dir / CATALOG_FILE}"
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(data_dir / CATALOG_FILE))
    except duckdb.IOException as error:
        return f"catalog not refreshed (in use by another process: {error})"
    with con:
        con.execute(f"SET VARIABLE {ROOT_VARIABLE} = {literal(data_dir.resolve())}")
        con.execute("BEGIN TRANSACTION")
        for view in sorted(create):
            con.execute(f"CREATE OR REPLACE VIEW {view} AS {view_sql(data_dir, view)}")
            con.execute(f"COMMENT ON VIEW {view} IS {literal(_comment(data_dir))}")
        for view in sorted(drop):
            con.execute(f"DROP VIEW IF EXISTS {view}")
        con.execute("COMMIT")
    return f"catalog refreshed: {data_dir / CATALOG_FILE}"


def configure(con, data_dir: Path, memory_limit: str = DEFAULT_MEMORY_LIMIT, threads=None):
    """Bound a DuckDB connection's memory, give it a temporary directory in the data
    dir to spill to, and point the catalog's views at `data_dir`."""
    temp = Path(data_dir).resolve() / TEMP_DIR
    con.execute(f"SET memory_limit = {literal(memory_limit)}")
    con.execute(f"SET temp_directory = {literal(str(temp))}")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    con.execute(f"SET VARIABLE {ROOT_VARIABLE} = {literal(Path(data_dir).resolve())}")
    return con


def connect(data_dir: Path, memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int | None = None):
    """A read-only connection to the data dir's catalog: views over the current version
    of every round, read from this data dir wherever it lives now, with DuckDB's memory
    bounded by `memory_limit` (spilling to `<data_dir>/duckdb_tmp`)."""
    import duckdb

    path = Path(data_dir) / CATALOG_FILE
    if not path.is_file():
        raise SelfImproveError(
            f"No catalog at {path}",
            "run a round first (`selfimprove run`); a data dir with rounds builds it with "
            "`RoundStore(data_dir).refresh_catalog()` or `selfimprove gc`",
        )
    deadline = time.monotonic() + LOCK_RETRY_S
    while True:
        try:
            con = duckdb.connect(str(path), read_only=True)
            break
        except duckdb.IOException as error:
            if time.monotonic() > deadline:
                raise SelfImproveError(
                    f"The catalog {path} is held open for writing by another process "
                    f"({str(error).splitlines()[0]})",
                    "close that DuckDB session (a read-only one does not block), then retry",
                ) from None
            time.sleep(0.1)
    return configure(con, data_dir, memory_limit, threads)


def memory_connection(data_dir: Path, memory_limit: str = DEFAULT_MEMORY_LIMIT):
    """An in-memory DuckDB connection with the catalog's bounds (for queries that read
    named files, such as lineage): no catalog file needed, no lock taken."""
    import duckdb

    return configure(duckdb.connect(), data_dir, memory_limit)
