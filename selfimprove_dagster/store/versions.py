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

Old versions stay on disk until `collect_garbage` (the `selfimprove gc` command)
removes them. Nothing here knows about rounds; `storage.RoundStore` names the folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from selfimprove_dagster.errors import SelfImproveError

POINTER = "current.json"
TMP_PREFIX = ".tmp-"
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
    """Write `data` to a unique temporary sibling, flush it, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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

    def path(self, table: str) -> Path:
        return self.folder / self.tables[table]

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "tables": self.tables,
            "row_counts": self.row_counts,
            "table_hashes": self.table_hashes,
            "data_version": self.data_version,
            "run_id": self.run_id,
            "created_at": self.created_at,
        }


def set_hash(table_hashes: dict[str, str]) -> str:
    """Content hash of a set of tables (names and bytes), independent of order."""
    lines = "\n".join(f"{name}\x00{h}" for name, h in sorted(table_hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def publish_tables(
    directory: Path, frames: dict[str, pl.DataFrame], run_id: str | None = None
) -> TableVersion:
    """Write `frames` as one new version under `directory` and make it current.

    Order: write every file into a temporary folder, rename the folder to its version
    id, then replace the pointer. A kill before the last step leaves the previous
    version current (the folders it left are collected by `collect_garbage`).
    """
    if not frames:
        raise ValueError("publish_tables needs at least one table")
    directory.mkdir(parents=True, exist_ok=True)
    version = new_version_id(run_id)
    staging = directory / temp_name(version)
    staging.mkdir()
    tables, counts, hashes = {}, {}, {}
    for table, frame in frames.items():
        name = f"{table}.parquet"
        frame.write_parquet(staging / name)
        tables[table], counts[table] = name, frame.height
        hashes[table] = _hash_file(staging / name)
    folder = directory / version
    os.rename(staging, folder)
    published = TableVersion(
        version=version,
        folder=folder,
        tables=tables,
        row_counts=counts,
        table_hashes=hashes,
        data_version=set_hash(hashes),
        run_id=run_id,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    replace_file_atomic(directory / POINTER, json.dumps(published.to_json(), indent=1).encode())
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
