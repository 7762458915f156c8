"""Versioned, atomically published folders: the one way anything multi-file is written.

A step's output is a *version*: a folder written under a unique temporary name, then
made current by one atomic step. Readers only ever see the previous complete version
or the new complete one, whatever instant a writer is killed at, and two writers never
share a temporary name (host, pid and a random suffix are in it).

Two flavours of "current":

    tables:       <dir>/<version_id>/<table>.parquet  +  <dir>/current.json
                  (a pointer file, replaced with os.replace; it lists the tables of the
                  version, their row counts and content hashes)
    checkpoints:  <parent>/<name>@<version_id>/       +  <parent>/<name> -> <name>@<version_id>
                  (a symlink, replaced with os.replace; model references keep the
                  stable path <parent>/<name>)

A table version can carry an *id index* beside a table (`<table>.ids`: the sorted
32-bit keys of one id column, `id_key`), so a reader finds which versions may hold an
id by probing a few bytes of each (`index_may_hold`) instead of scanning the tables.

A write that runs out of disk space (`ENOSPC`, a quota) removes its temporary files
and raises one `SelfImproveError` naming the path, the space it needed, the space free
and the fix (`errors.disk_full_error`); the previous version stays current.

Old versions stay on disk until `collect_garbage` (the `selfimprove gc` command)
removes them. Nothing here knows about rounds; `storage.RoundStore` names the folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from selfimprove_dagster.errors import SelfImproveError, disk_full_error, is_disk_full

POINTER = "current.json"
TMP_PREFIX = ".tmp-"
INDEX_SUFFIX = ".ids"  # <table>.ids: sorted little-endian uint32 keys of one id column
# Temporary folders of another host (or whose process we cannot see) are only
# collected once they are this old.
FOREIGN_TMP_MAX_AGE_S = 24 * 3600


def new_version_id(run_id: str | None = None) -> str:
    """Unique per materialization and sortable by time: `<UTC time>-<run>-<random>`."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    run = (run_id or "local").replace("-", "")[:8] or "local"
    return f"{stamp}-{run}-{uuid.uuid4().hex[:8]}"


def temp_name(label: str) -> str:
    """A temporary name no other writer uses: host, pid and a random suffix."""
    host = socket.gethostname().replace("-", "_")[:32]
    return f"{TMP_PREFIX}{label}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def replace_file_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a unique temporary sibling, flush it, then rename over `path`
    (out of disk space: the temporary file is removed and `path` is unchanged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full_error(path.name, path.parent, len(data)) from None
        raise


def replace_link_atomic(link: Path, target: str) -> None:
    """Point the symlink `link` at `target` (a path relative to the link's folder, so
    the tree can move) with one rename: readers see the old target or the new one."""
    tmp = link.with_name(temp_name(link.name))
    for attempt in range(3):
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(target, tmp)
            break
        except FileNotFoundError:  # another writer removed the emptied folder meanwhile
            if attempt == 2:
                raise
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- id indexes ------------------------------------------------------------------------

_HEX_KEY = re.compile(r"^[0-9a-fA-F]{8}")


def id_key(value: str) -> int:
    """The 32-bit index key of an id: its first 8 hex digits (ids are hashes), or, for
    an id that does not start with 8 hex digits, the first 32 bits of its sha256."""
    if _HEX_KEY.match(value):
        return int(value[:8], 16)
    return int(hashlib.sha256(value.encode("utf-8")).hexdigest()[:8], 16)


def id_keys(ids: pl.Series):
    """`id_key` of every non-null id, sorted (a numpy uint32 array); vectorized for the
    usual hex ids, per value for the others."""
    import numpy as np

    ids = ids.drop_nulls().cast(pl.String)
    hex_ids = ids.str.contains(_HEX_KEY.pattern)
    keys = ids.filter(hex_ids).str.slice(0, 8).str.to_integer(base=16).cast(pl.UInt32)
    others = [id_key(v) for v in ids.filter(~hex_ids).to_list()]
    array = np.concatenate([keys.to_numpy(), np.asarray(others, dtype=np.uint32)])
    return np.sort(array.astype("<u4"), kind="stable")


def write_id_index(path: Path, ids: pl.Series) -> None:
    """Write the sorted keys of `ids` to `path` (4 bytes an id)."""
    id_keys(ids).tofile(path)


def index_may_hold(path: Path, value: str) -> bool:
    """Whether the id index at `path` may hold `value` (a 32-bit key match: an index
    of a million ids gives a false "maybe" for one value in about 4,000, never a false
    "no"). A binary search over the memory-mapped file: about 20 reads of 4 bytes."""
    import mmap
    import struct

    key = id_key(value)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size // 4
        if size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as keys:
            low, high = 0, size
            while low < high:  # the first position whose key is >= `key`
                middle = (low + high) // 2
                if struct.unpack_from("<I", keys, 4 * middle)[0] < key:
                    low = middle + 1
                else:
                    high = middle
            return low < size and struct.unpack_from("<I", keys, 4 * low)[0] == key


@dataclass(frozen=True)
class TableVersion:
    """One published set of tables (what `current.json` holds)."""

    version: str  # unique id of the materialization that wrote the set
    folder: Path  # <dir>/<version>
    tables: dict[str, str] = field(default_factory=dict)  # table -> file name
    row_counts: dict[str, int] = field(default_factory=dict)
    table_hashes: dict[str, str] = field(default_factory=dict)  # sha256 of each file
    data_version: str = ""  # sha256 over the set's table hashes: the Dagster data version
    run_id: str | None = None
    created_at: str = ""
    # table -> its id index file (derived from the table: not part of the data version)
    indexes: dict[str, str] = field(default_factory=dict)

    def path(self, table: str) -> Path:
        return self.folder / self.tables[table]

    def index_path(self, table: str) -> Path | None:
        """The id index of `table` in this version (None: not indexed)."""
        return self.folder / self.indexes[table] if table in self.indexes else None

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "tables": self.tables,
            "row_counts": self.row_counts,
            "table_hashes": self.table_hashes,
            "data_version": self.data_version,
            "run_id": self.run_id,
            "created_at": self.created_at,
            "indexes": self.indexes,
        }


def set_hash(table_hashes: dict[str, str]) -> str:
    """Content hash of a set of tables (names and bytes), independent of order."""
    lines = "\n".join(f"{name}\x00{h}" for name, h in sorted(table_hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def publish_tables(
    directory: Path,
    frames: dict[str, pl.DataFrame],
    run_id: str | None = None,
    index_columns: dict[str, str] | None = None,
) -> TableVersion:
    """Write `frames` as one new version under `directory` and make it current.

    Order: write every file into a temporary folder, rename the folder to its version
    id, then replace the pointer. A kill before the last step leaves the previous
    version current (the folders it left are collected by `collect_garbage`); running
    out of disk space removes the temporary folder and raises one line
    (`disk_full_error`). `index_columns` ({table: id column}) adds an id index beside
    each of those tables that has the column.
    """
    if not frames:
        raise ValueError("publish_tables needs at least one table")
    directory.mkdir(parents=True, exist_ok=True)
    version = new_version_id(run_id)
    staging = directory / temp_name(version)
    tables, counts, hashes, indexes = {}, {}, {}, {}
    try:
        staging.mkdir()
        for table, frame in frames.items():
            name = f"{table}.parquet"
            frame.write_parquet(staging / name)
            tables[table], counts[table] = name, frame.height
            hashes[table] = _hash_file(staging / name)
            column = (index_columns or {}).get(table)
            if column and column in frame.columns:
                indexes[table] = f"{table}{INDEX_SUFFIX}"
                write_id_index(staging / indexes[table], frame[column])
        folder = directory / version
        os.rename(staging, folder)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error):
            # An upper bound: the frames' size in memory (their Parquet files are smaller).
            needed = sum(frame.estimated_size() for frame in frames.values())
            what = f"a new version of {', '.join(frames)} (the previous one stays current)"
            raise disk_full_error(what, directory, needed) from None
        raise
    published = TableVersion(
        version=version,
        folder=folder,
        tables=tables,
        row_counts=counts,
        table_hashes=hashes,
        data_version=set_hash(hashes),
        run_id=run_id,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        indexes=indexes,
    )
    try:
        pointer = json.dumps(published.to_json(), indent=1).encode()
        replace_file_atomic(directory / POINTER, pointer)
    except SelfImproveError:
        shutil.rmtree(folder, ignore_errors=True)  # never current: nobody reads it
        raise
    return published


def current_tables(directory: Path) -> TableVersion | None:
    """The current version under `directory`, or None before the first publish."""
    pointer = directory / POINTER
    if not pointer.is_file():
        return None
    try:
        data = json.loads(pointer.read_text())
        return TableVersion(
            version=data["version"],
            folder=directory / data["version"],
            tables=dict(data["tables"]),
            row_counts=dict(data.get("row_counts", {})),
            table_hashes=dict(data.get("table_hashes", {})),
            data_version=data.get("data_version", ""),
            run_id=data.get("run_id"),
            created_at=data.get("created_at", ""),
            indexes=dict(data.get("indexes", {})),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise SelfImproveError(
            f"The version pointer {pointer} is unreadable ({error})",
            "delete it and re-materialize that step for the round",
        ) from None


# --- folders published behind a symlink (checkpoints) ------------------------------------


def staging_dir(target: Path) -> Path:
    """A fresh, uniquely named temporary folder beside `target` to write a version into."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(temp_name(target.name))
    staging.mkdir()
    return staging


def publish_dir(staging: Path, target: Path, run_id: str | None = None) -> Path:
    """Make the complete folder `staging` the current version behind `target`.

    `staging` is renamed to `<target>@<version id>` and the symlink `target` is swapped
    to it with one rename, so `target` always names a complete folder (the old one or
    the new one). Returns the version folder.
    """
    version = target.with_name(f"{target.name}@{new_version_id(run_id)}")
    os.rename(staging, version)
    link = target.with_name(temp_name(target.name + ".link"))
    os.symlink(version.name, link)
    if target.is_dir() and not target.is_symlink():
        # A folder from before versioning: keep it as an old version, then link.
        os.rename(target, target.with_name(f"{target.name}@legacy-{uuid.uuid4().hex[:8]}"))
    os.replace(link, target)
    return version


def current_dir(target: Path) -> Path | None:
    """The version folder `target` points at (a pre-versioning folder: itself)."""
    if target.is_symlink():
        resolved = target.parent / os.readlink(target)
        return resolved if resolved.is_dir() else None
    return target if target.is_dir() else None


# --- garbage collection -------------------------------------------------------------------


def _tmp_is_abandoned(path: Path) -> bool:
    """A temporary entry whose writer is gone: same host and a dead pid, or very old."""
    parts = path.name[len(TMP_PREFIX) :].split("-")
    host = socket.gethostname().replace("-", "_")[:32]
    if len(parts) >= 3 and parts[-3] == host and parts[-2].isdigit():
        try:
            os.kill(int(parts[-2]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return time.time() - path.lstat().st_mtime > FOREIGN_TMP_MAX_AGE_S


def abandoned_temps(folder: Path) -> list[Path]:
    """Temporary entries directly under `folder` whose writer is gone."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX) and _tmp_is_abandoned(p)
    )


def stale_table_versions(directory: Path) -> list[Path]:
    """Everything under a tables `directory` that no reader can see: versions other than
    the current one, and abandoned temporary folders."""
    if not directory.is_dir():
        return []
    current = current_tables(directory)
    stale = []
    for entry in sorted(directory.iterdir()):
        if entry.name == POINTER or (current and entry.name == current.version):
            continue
        if entry.name.startswith(TMP_PREFIX) and not _tmp_is_abandoned(entry):
            continue
        stale.append(entry)
    return stale


def stale_dir_versions(parent: Path) -> list[Path]:
    """Version folders under `parent` that no symlink points at, and abandoned temps."""
    if not parent.is_dir():
        return []
    links = [p for p in parent.iterdir() if p.is_symlink() and not p.name.startswith(TMP_PREFIX)]
    current = {(parent / os.readlink(p)).name for p in links}
    stale = []
    for entry in sorted(parent.iterdir()):
        if entry in links or entry.name in current:
            continue
        if entry.name.startswith(TMP_PREFIX):
            if _tmp_is_abandoned(entry):
                stale.append(entry)
        elif "@" in entry.name:
            stale.append(entry)
    return stale


def remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
