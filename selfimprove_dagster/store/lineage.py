"""Lineage over a data dir: what a checkpoint was trained on, and where a generation went.

    checkpoint_lineage(store, "round_002", limit=10)  # filtered -> generations -> policy, T
    generation_lineage(store, "5d142a3b...")  # verdict -> kept? -> checkpoint -> later rounds

Both read only the rounds they need, so they cost the same at round 100 as at round 1:

- an id leads to its round through the id indexes beside each round's tables
  (`RoundStore.rounds_holding`: a few bytes read per round, never the tables);
- ids hash their round, so an id's critiques, refinement and filtered row live in the
  round of its generation, and a round's filtered rows join that round's generations;
- the rounds that descend from a checkpoint come from the checkpoints' manifests (which
  checkpoint, by adapter hash, sampled each round's data), not from the generations.

They read the current version of each table through the rounds' pointers (never the
catalog's views), so they are exact right after a publish and answer from the data dir
they are given wherever it was copied or moved. A row has the columns of its own round's
file (the catalog's views add, as nulls, the columns other rounds have).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.models import is_checkpoint, read_manifest
from selfimprove_dagster.store import catalog
from selfimprove_dagster.store.storage import (
    ROUND_PATTERN,
    RoundStore,
    checkpoint_round,
    step_of,
)

# The columns of `checkpoint_lineage`'s rows (and the table each comes from).
TRAINED_ON_COLUMNS = (
    "generation_id",
    "round",
    "policy",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "source",
    "refined_from",
    "feedback",
    "prompt_id",
    "prompt",
    "completion",
)
STREAM_BATCH = 10_000  # rows fetched at a time by `trained_on_rows`


# --- reading one round's files -----------------------------------------------------------


def _connect(store: RoundStore):
    return catalog.memory_connection(store.data_dir)


def _rows(con, sql: str) -> list[dict[str, Any]]:
    cursor = con.execute(sql)  # values inlined with `catalog.literal`, never bound
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _file(store: RoundStore, round_: str, table: str) -> str | None:
    """The file of `round_`'s current `table` (None: the round has none); a pointer
    naming a file that is gone is one line with the fix."""
    path = store.table_path(round_, table)
    if path is None:
        return None
    if not path.is_file():
        raise SelfImproveError(
            f"{round_}'s current `{table}` table is missing ({path})",
            f"re-materialize `{step_of(table)}` for {round_} (it writes a new version), or "
            "restore the data dir from a complete copy",
        )
    return str(path)


def _scan(path: str) -> str:
    return f"read_parquet({catalog.literal(path)})"


def _columns(con, path: str) -> set[str]:
    return {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {_scan(path)}").fetchall()}


def _pick(con, path: str | None, columns: dict[str, str], round_: str) -> str:
    """A subquery over one table file with exactly `columns` ({name: DuckDB type}): a
    column the file lacks is null (`round`: the round the file belongs to); no file is
    an empty subquery."""
    have = _columns(con, path) if path else set()
    select = []
    for name, type_ in columns.items():
        if name in have:
            select.append(f'"{name}"')
        elif name == "round":
            select.append(f"'{round_}'::VARCHAR AS round")
        else:
            select.append(f'NULL::{type_} AS "{name}"')
    if path is None:
        return f"(SELECT {', '.join(select)} WHERE false)"
    return f"(SELECT {', '.join(select)} FROM {_scan(path)})"


def _find(con, store: RoundStore, table: str, rounds: list[str], generation_id: str):
    """The first row of `table` with `generation_id` in `rounds` (in order), and its
    round; (None, None) when none holds it."""
    for round_ in rounds:
        path = _file(store, round_, table)
        if path is None:
            continue
        found = _rows(
            con,
            f"SELECT * FROM {_scan(path)} WHERE generation_id = {catalog.literal(generation_id)}",
        )
        if found:
            return found[0], round_
    return None, None


def _reading(store: RoundStore, error: Exception) -> SelfImproveError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return SelfImproveError(
        f"Could not read the round tables under {store.data_dir} for lineage: {reason}",
        "re-materialize the round whose file is missing or damaged (a new version "
        "replaces it), or restore the data dir from a complete copy",
    )


# --- what a checkpoint was trained on --------------------------------------------------


def _checkpoint_row(con, store: RoundStore, round_: str) -> dict[str, Any] | None:
    path = _file(store, round_, "checkpoints")
    rows = _rows(con, f"SELECT * FROM {_scan(path)} LIMIT 1") if path else []
    return rows[0] if rows else None


def _trained_on_sql(con, store: RoundStore, round_: str) -> tuple[str, str]:
    """(FROM clause, ORDER BY) of a round's training rows: its filtered rows, each with
    its generation (a refined row: the sample it rewrote) and sampling settings."""
    filtered = _pick(
        con,
        _file(store, round_, "filtered"),
        {"generation_id": "VARCHAR", "source": "VARCHAR", "prompt_id": "VARCHAR"}
        | {"prompt": "VARCHAR", "completion": "VARCHAR"},
        round_,
    )
    refinements = _pick(
        con,
        _file(store, round_, "refinements"),
        {"generation_id": "VARCHAR", "parent_generation_id": "VARCHAR", "feedback": "VARCHAR"},
        round_,
    )
    generations = _pick(
        con,
        _file(store, round_, "generations"),
        {"generation_id": "VARCHAR", "round": "VARCHAR", "policy": "VARCHAR"}
        | {"temperature": "DOUBLE", "top_p": "DOUBLE", "top_k": "BIGINT", "seed": "BIGINT"},
        round_,
    )
    joined = f"""
        FROM {filtered} f
        LEFT JOIN {refinements} r USING (generation_id)
        JOIN {generations} g
          ON g.generation_id = coalesce(r.parent_generation_id, f.generation_id)
    """
    return joined, "ORDER BY f.prompt_id, f.generation_id"


_TRAINED_ON_SELECT = """
    SELECT f.generation_id, g.round, g.policy, g.temperature, g.top_p, g.top_k, g.seed,
           f.source, r.parent_generation_id AS refined_from, r.feedback,
           f.prompt_id, f.prompt, f.completion
"""


def checkpoint_lineage(store: RoundStore, round_: str, limit: int | None = None) -> dict[str, Any]:
    """The checkpoint of `round_`: its manifest row, the filtered rows it was trained on
    (the first `limit` by prompt and generation id; all with None) with each
    generation's round, policy and sampling settings, and how many there are in all
    (`trained_on_count`). Reads only `round_`'s files."""
    if not ROUND_PATTERN.match(round_):
        raise SelfImproveError(f"`{round_}` is not a round key", "use e.g. round_002")
    import duckdb

    try:
        with _connect(store) as con:
            checkpoint = _checkpoint_row(con, store, round_)
            if checkpoint is None:
                raise SelfImproveError(
                    f"{round_} has no checkpoint", "materialize the round first (`selfimprove run`)"
                )
            joined, order = _trained_on_sql(con, store, round_)
            if limit is None:
                trained_on = _rows(con, f"{_TRAINED_ON_SELECT} {joined} {order}")
                count = len(trained_on)
            else:
                trained_on, count = _page(con, joined, order, int(limit))
    except duckdb.Error as error:
        raise _reading(store, error) from None
    return {"checkpoint": checkpoint, "trained_on": trained_on, "trained_on_count": count}


def _page(con, joined: str, order: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The first `limit` training rows and the count of all. The join runs once over the
    ids only (what the count and the order need); the rows' text is then read for the
    `limit` ids alone, so a million-row round costs one id join, not a join of its text."""
    keys = con.execute(
        f"SELECT f.generation_id, count(*) OVER () {joined} {order} LIMIT {limit}"
    ).fetchall()
    if not keys:
        return [], 0
    listed = ", ".join(catalog.literal(key) for key, _ in keys)
    rows = _rows(
        con,
        f"{_TRAINED_ON_SELECT} {joined} WHERE f.generation_id IN ({listed}) {order} LIMIT {limit}",
    )
    return rows, keys[0][1]


def trained_on_rows(store: RoundStore, round_: str) -> Iterator[dict[str, Any]]:
    """Every training row of `round_`'s checkpoint (as `checkpoint_lineage`), streamed in
    batches of `STREAM_BATCH`: memory stays flat for a million-row round."""
    if not ROUND_PATTERN.match(round_):
        raise SelfImproveError(f"`{round_}` is not a round key", "use e.g. round_002")
    import duckdb

    try:
        with _connect(store) as con:
            joined, order = _trained_on_sql(con, store, round_)
            cursor = con.execute(f"{_TRAINED_ON_SELECT} {joined} {order}")
            names = [d[0] for d in cursor.description]
            while batch := cursor.fetchmany(STREAM_BATCH):
                yield from (dict(zip(names, row, strict=True)) for row in batch)
    except duckdb.Error as error:
        raise _reading(store, error) from None


# --- where a generation went -------------------------------------------------------------


def generation_lineage(store: RoundStore, generation_id: str) -> dict[str, Any]:
    """A generation, its critique, whether it was kept, the checkpoint trained on it,
    and the later rounds whose policy descends from that checkpoint. A refined answer's
    id gives its refinement (feedback, original answer) and the sample it rewrote.
    Reads the id indexes of every round and the tables of the round that holds the id."""
    import duckdb

    try:
        with _connect(store) as con:
            return _generation_lineage(con, store, generation_id)
    except duckdb.Error as error:
        raise _reading(store, error) from None


def _generation_lineage(con, store: RoundStore, generation_id: str) -> dict[str, Any]:
    refinement, home = _find(
        con,
        store,
        "refinements",
        store.rounds_holding("refinements", generation_id),
        generation_id,
    )
    sampled_id = refinement["parent_generation_id"] if refinement else generation_id
    generation, sampled_in = (None, None)
    if sampled_id is not None:
        generation, sampled_in = _find(
            con, store, "generations", store.rounds_holding("generations", sampled_id), sampled_id
        )
    if generation is None:  # an online RL round's rollout?
        rollout, rollout_round = _find(
            con, store, "rollouts", store.rounds_holding("rollouts", generation_id), generation_id
        )
        if rollout is not None:
            return _rollout_lineage(con, store, rollout, rollout_round)
        raise SelfImproveError(
            f"No generation `{generation_id}` in the data dir {store.data_dir}",
            "copy an id from the generations table (`selfimprove lineage round_NNN`)",
        )
    home = home or sampled_in  # the round of the id's own row
    critiques = _rows_of(con, store, "critiques", home, generation_id)
    kept = _rows_of(con, store, "filtered", home, generation_id)
    trained = None
    if kept:
        row = _checkpoint_row(con, store, home)
        trained = {"round": kept[0].get("round", home), "checkpoint": row["path"] if row else None}
    return {
        "generation": generation,
        "refinement": refinement,
        "critiques": critiques,
        "trained_into": trained,
        "descendant_rounds": _descendants(con, store, home)
        if trained and trained["checkpoint"]
        else [],
    }


def _rows_of(con, store: RoundStore, table: str, round_: str, generation_id: str):
    path = _file(store, round_, table)
    if path is None:
        return []
    return _rows(
        con, f"SELECT * FROM {_scan(path)} WHERE generation_id = {catalog.literal(generation_id)}"
    )


def _rollout_lineage(con, store: RoundStore, rollout: dict[str, Any], round_: str):
    """A grpo/rloo rollout: it is its own critique (reward, advantage) and was trained
    on directly, in its optimizer step, by its round's checkpoint."""
    row = _checkpoint_row(con, store, round_)
    trained = {"round": row.get("round", round_), "checkpoint": row["path"]} if row else None
    return {
        "generation": rollout,
        "refinement": None,
        "critiques": [rollout],
        "trained_into": trained,
        "descendant_rounds": _descendants(con, store, round_) if trained else [],
    }


# --- the checkpoint chain ------------------------------------------------------------------


def sampled_by(con, store: RoundStore) -> dict[str, str]:
    """{round: the round whose checkpoint sampled its generations}, for rounds sampled by
    a checkpoint of this data dir. From the manifests: a checkpoint records the policy
    that sampled its data by round and adapter hash, so a round sampled by another data
    dir's checkpoint, or by a version of a round since re-trained, is nobody's child
    here. A round without a checkpoint yet (the last one, usually) is read from the
    first `policy` of its generations: a name of one of our checkpoints."""
    manifests = {}
    for round_ in store.round_keys():
        folder = store.checkpoint_dir(round_)
        if is_checkpoint(folder):
            manifests[round_] = read_manifest(folder)
    names = {round_: {store.checkpoint_ref(round_)} for round_ in manifests}
    parents: dict[str, str] = {}
    for round_, manifest in manifests.items():
        identity = manifest.get("policy_identity") or {}
        parent = None
        if identity.get("kind") == "checkpoint":
            parent = identity.get("round")
            recorded = identity.get("adapter_sha256")
            if parent not in manifests or recorded != manifests[parent].get("adapter_sha256"):
                parent = None
        elif not identity:  # written before identities: the round the asset recorded
            parent = manifest.get("parent_round")
        if parent in manifests:
            parents[round_] = parent
            if manifest.get("policy"):
                names[parent].add(str(manifest["policy"]))
    for round_ in store.round_keys():
        if round_ in manifests:
            continue
        policy = _first_policy(con, store, round_)
        parent = next((p for p, known in names.items() if policy in known), None)
        if parent is None and policy and _in_checkpoints_dir(store, policy):
            parent = checkpoint_round(policy)
        if parent in manifests:
            parents[round_] = parent
    return parents


def _first_policy(con, store: RoundStore, round_: str) -> str | None:
    path = _file(store, round_, "generations")
    if path is None or "policy" not in _columns(con, path):
        return None
    row = con.execute(f"SELECT policy FROM {_scan(path)} LIMIT 1").fetchone()
    return row[0] if row else None


def _in_checkpoints_dir(store: RoundStore, policy: str) -> bool:
    return os.path.abspath(Path(policy).parent) == os.path.abspath(store.checkpoints_dir)


def _descendants(con, store: RoundStore, round_: str) -> list[str]:
    """Rounds generated by `round_`'s checkpoint, or by a checkpoint trained on top of
    it, breadth first (each generation of descendants in round order)."""
    children: dict[str, list[str]] = {}
    for child, parent in sampled_by(con, store).items():
        children.setdefault(parent, []).append(child)
    found: list[str] = []
    frontier = [round_]
    while frontier:
        new = sorted({c for p in frontier for c in children.get(p, [])} - set(found))
        found += new
        frontier = new
    return found
