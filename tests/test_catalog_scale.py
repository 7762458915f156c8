"""Lineage and the catalog at scale, checked small: the pruned lineage (id indexes, one
round's files, the manifests' chain) gives the answers of the full scan it replaced; the
catalog's views over their links equal views listing every current file; a publish
changes no view; other rounds' files are never read; DuckDB's memory is bounded.

The data dir is built by `benchmarks/bench_catalog.py`'s builder (the benchmark's own
code path, through `RoundStore.publish`), 4 rounds of 240 generations, round_002 with
Self-Refine-style refinements."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest

from selfimprove_dagster import ids
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.store import catalog, lineage, versions
from selfimprove_dagster.store.storage import CATALOG_TABLES, RoundStore

ROUNDS, ROWS = 4, 240


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_catalog.py"
    spec = importlib.util.spec_from_file_location("bench_catalog", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _add_refinements(store: RoundStore, round_: str) -> None:
    """Refine the first 12 rejected samples of `round_`; keep the refined answers (one
    of which rewrote a sample that was kept too) beside the round's kept samples."""
    critiques = store.read(round_, "critiques")
    generations = store.read(round_, "generations")
    rejected = critiques.filter(pl.col("verdict") == "reject").head(12)["generation_id"]
    parents = generations.filter(pl.col("generation_id").is_in(rejected.implode()))
    refinements = parents.select(
        "round",
        pl.col("generation_id")
        .map_elements(ids.refined_generation_id, return_dtype=pl.String)
        .alias("generation_id"),
        pl.col("generation_id").alias("parent_generation_id"),
        "prompt_id",
        "sample_index",
        "prompt",
        pl.col("completion").alias("original_completion"),
        pl.lit("critic").alias("feedback_source"),
        pl.lit("check the sum").alias("feedback"),
        pl.lit("The answer is 42.").alias("completion"),
        pl.lit("refined").alias("source"),
    )
    refined_critiques = refinements.select(
        "round",
        "generation_id",
        "prompt_id",
        pl.lit("refiner").alias("critic"),
        pl.lit("accept").alias("verdict"),
        pl.lit(True).alias("correct"),
        pl.lit("42").alias("extracted_answer"),
        pl.lit(None, pl.String).alias("reference_answer"),
        pl.lit("refined").alias("reason"),
        pl.lit(1.0).alias("score"),
    )
    store.publish(
        round_,
        "critiques",
        {
            "critiques": pl.concat([critiques, refined_critiques], how="diagonal_relaxed"),
            "refinements": refinements,
        },
    )
    filtered = store.read(round_, "filtered")
    kept = refinements.select("round", "generation_id", "prompt_id", "prompt", "completion")
    kept = kept.with_columns(pl.lit("refined").alias("source"))
    store.publish(
        round_, "filtered", {"filtered": pl.concat([filtered, kept], how="diagonal_relaxed")}
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> RoundStore:
    store = RoundStore(tmp_path_factory.mktemp("scale") / "var")
    bench = _bench()
    for index in range(ROUNDS):
        bench.build_round(store, index, ROWS)
    _add_refinements(store, "round_002")
    store.refresh_catalog()
    return store


# --- the full scan the pruned lineage replaced (the catalog before links and indexes) ---


def _full_scan(store: RoundStore):
    """An in-memory DuckDB whose views list every round's current file, as the catalog
    did before: the oracle."""
    con = duckdb.connect()
    for table in CATALOG_TABLES:
        files = store.current_files(table)
        if files:
            listed = ", ".join(f"'{f}'" for f in files)
            con.execute(
                f"CREATE VIEW {table} AS SELECT * FROM "
                f"read_parquet([{listed}], union_by_name = true)"
            )
    return con


def _rows(con, sql: str, *params: Any) -> list[dict[str, Any]]:
    cursor = con.execute(sql, list(params))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _views(con) -> set[str]:
    return {row[0] for row in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}


def _refinements(con) -> str:
    if "refinements" in _views(con):
        return "refinements"
    return (
        "(SELECT NULL::VARCHAR AS generation_id, NULL::VARCHAR AS parent_generation_id, "
        "NULL::VARCHAR AS feedback WHERE false)"
    )


def _scan_checkpoint(con, round_: str) -> dict:
    checkpoint = _rows(con, "SELECT * FROM checkpoints WHERE round = ?", round_)
    trained_on = _rows(
        con,
        f"""
        SELECT f.generation_id, g.round, g.policy, g.temperature, g.top_p, g.top_k,
               g.seed, f.source, r.parent_generation_id AS refined_from, r.feedback,
               f.prompt_id, f.prompt, f.completion
        FROM filtered f
        LEFT JOIN {_refinements(con)} r USING (generation_id)
        JOIN generations g
          ON g.generation_id = coalesce(r.parent_generation_id, f.generation_id)
        WHERE f.round = ?
        ORDER BY f.prompt_id, f.generation_id
        """,
        round_,
    )
    return {"checkpoint": checkpoint[0], "trained_on": trained_on}


def _scan_descendants(con, checkpoint: str | None) -> list[str]:
    found: list[str] = []
    frontier = [checkpoint] if checkpoint else []
    while frontier:
        rows = _rows(
            con,
            f"""
            SELECT DISTINCT g.round, c.path AS checkpoint
            FROM generations g LEFT JOIN checkpoints c ON c.round = g.round
            WHERE g.policy IN ({", ".join("?" for _ in frontier)})
            ORDER BY g.round
            """,
            *frontier,
        )
        new = [r for r in rows if r["round"] not in found]
        found += [r["round"] for r in new]
        frontier = [r["checkpoint"] for r in new if r["checkpoint"]]
    return found


def _scan_generation(con, generation_id: str) -> dict:
    refinement = _rows(
        con, f"SELECT * FROM {_refinements(con)} WHERE generation_id = ?", generation_id
    )
    sampled_id = refinement[0]["parent_generation_id"] if refinement else generation_id
    generation = _rows(con, "SELECT * FROM generations WHERE generation_id = ?", sampled_id)
    if not generation:
        raise SelfImproveError(f"No generation `{generation_id}`", "-")
    critiques = _rows(con, "SELECT * FROM critiques WHERE generation_id = ?", generation_id)
    kept = _rows(
        con,
        "SELECT f.round, c.path AS checkpoint FROM filtered f "
        "LEFT JOIN checkpoints c ON c.round = f.round WHERE f.generation_id = ?",
        generation_id,
    )
    return {
        "generation": generation[0],
        "refinement": refinement[0] if refinement else None,
        "critiques": critiques,
        "trained_into": kept[0] if kept else None,
        "descendant_rounds": _scan_descendants(con, kept[0]["checkpoint"]) if kept else [],
    }


def _set(row: dict | None) -> dict | None:
    """A row without its null columns: the views add, as nulls, other rounds' columns."""
    return None if row is None else {k: v for k, v in row.items() if v is not None}


def _same(pruned: dict, scanned: dict) -> None:
    assert _set(pruned["generation"]) == _set(scanned["generation"])
    assert _set(pruned["refinement"]) == _set(scanned["refinement"])
    assert [_set(c) for c in pruned["critiques"]] == [_set(c) for c in scanned["critiques"]]
    assert pruned["trained_into"] == scanned["trained_into"]
    assert pruned["descendant_rounds"] == scanned["descendant_rounds"]


# --- lineage: pruned == full scan ----------------------------------------------------------


@pytest.mark.parametrize("round_", [f"round_{i:03d}" for i in range(ROUNDS)])
def test_checkpoint_lineage_equals_the_full_scan(built, round_):
    with _full_scan(built) as con:
        scanned = _scan_checkpoint(con, round_)
    found = lineage.checkpoint_lineage(built, round_)
    assert _set(found["checkpoint"]) == _set(scanned["checkpoint"])
    assert found["trained_on"] == scanned["trained_on"]
    assert found["trained_on_count"] == len(scanned["trained_on"]) > 0
    page = lineage.checkpoint_lineage(built, round_, limit=10)
    assert page["trained_on"] == scanned["trained_on"][:10]
    assert page["trained_on_count"] == len(scanned["trained_on"])  # the count of all rows
    assert list(lineage.trained_on_rows(built, round_)) == scanned["trained_on"]


def test_refined_rows_lead_to_the_samples_they_rewrote(built):
    found = lineage.checkpoint_lineage(built, "round_002")
    refined = [r for r in found["trained_on"] if r["source"] == "refined"]
    assert len(refined) == 12 and all(r["refined_from"] and r["policy"] for r in refined)


def _ids(store: RoundStore, round_: str, table: str, n: int = 6) -> list[str]:
    return store.read(round_, table)["generation_id"].head(n).to_list()


def test_generation_lineage_equals_the_full_scan(built):
    rejected = built.read("round_001", "critiques").filter(pl.col("verdict") == "reject")
    cases = (
        _ids(built, "round_000", "filtered")  # kept: trained into round_000, 3 descendants
        + _ids(built, "round_003", "generations")  # the last round
        + rejected["generation_id"].head(3).to_list()  # not kept
        + _ids(built, "round_002", "refinements")  # refined answers -> the rewritten sample
    )
    with _full_scan(built) as con:
        for generation_id in cases:
            _same(
                lineage.generation_lineage(built, generation_id),
                _scan_generation(con, generation_id),
            )
    kept = lineage.generation_lineage(built, cases[0])
    assert kept["descendant_rounds"] == ["round_001", "round_002", "round_003"]


def test_an_unknown_id_names_the_fix(built):
    with pytest.raises(SelfImproveError, match="No generation `0123456789abcdef`"):
        lineage.generation_lineage(built, "0123456789abcdef")
    with pytest.raises(SelfImproveError, match="round_009 has no checkpoint"):
        lineage.checkpoint_lineage(built, "round_009")


# --- lineage reads only the rounds it needs ---------------------------------------------------


def _break_tables(store: RoundStore, rounds: list[str]) -> None:
    """Make every table of `rounds` unreadable (their id indexes stay)."""
    for round_ in rounds:
        for table in ("generations", "critiques", "filtered", "prompts", "checkpoints"):
            store.table_path(round_, table).write_bytes(b"PAR1 not parquet")


def test_lineage_reads_only_the_rounds_it_needs(built, tmp_path):
    import shutil

    store = RoundStore(tmp_path / "var")
    shutil.copytree(built.data_dir, store.data_dir, symlinks=True)
    kept = _ids(store, "round_000", "filtered", 1)[0]
    last = _ids(store, "round_003", "generations", 1)[0]
    _break_tables(store, ["round_001", "round_002"])
    assert lineage.generation_lineage(store, kept)["descendant_rounds"] == [
        "round_001",
        "round_002",
        "round_003",
    ]  # from the manifests: no generations table read
    assert lineage.generation_lineage(store, last)["generation"]["round"] == "round_003"
    assert lineage.checkpoint_lineage(store, "round_003", limit=3)["trained_on_count"] > 0
    # A damaged file the lineage needs is one line with the fix, not a DuckDB traceback.
    with pytest.raises(SelfImproveError) as error:
        lineage.checkpoint_lineage(store, "round_001")
    assert "\n" not in str(error.value) and "Fix: re-materialize" in str(error.value)


def test_id_indexes_point_at_the_round_of_an_id(built):
    for round_ in ("round_000", "round_003"):
        for generation_id in _ids(built, round_, "generations", 50):
            assert built.rounds_holding("generations", generation_id) == [round_]
    refined = _ids(built, "round_002", "refinements", 1)[0]
    assert built.rounds_holding("refinements", refined) == ["round_002"]
    assert built.rounds_holding("generations", "ffffffffffffffff") == []
    assert built.rounds_holding("rollouts", refined) == []  # no round wrote rollouts


def test_a_version_without_an_index_is_always_searched(tmp_path):
    store = RoundStore(tmp_path)
    frame = pl.DataFrame({"round": ["round_000"], "generation_id": ["abcdef0123456789"]})
    store.publish("round_000", "generations", {"generations": frame})
    pointer = tmp_path / "rounds/round_000/generations/current.json"
    data = json.loads(pointer.read_text())
    assert data["indexes"] == {"generations": "generations.ids"}
    del data["indexes"]  # as a version published before indexes
    pointer.write_text(json.dumps(data))
    assert store.rounds_holding("generations", "0000000000000000") == ["round_000"]


def test_id_keys_are_the_hex_prefix_or_a_hash():
    assert versions.id_key("deadbeef01234567") == 0xDEADBEEF
    assert versions.id_key("DEADBEEFxyz") == 0xDEADBEEF
    assert versions.id_key("rationalized-1") == versions.id_key("rationalized-1")
    keys = versions.id_keys(pl.Series(["deadbeef01234567", None, "x-not-hex", "00000001aa"]))
    assert keys.tolist() == sorted([0xDEADBEEF, 1, versions.id_key("x-not-hex")])


def test_an_index_says_maybe_for_its_ids_and_no_for_others(tmp_path):
    values = [ids.generation_id("round_000", f"p{i}", 0) for i in range(5000)]
    path = tmp_path / "x.ids"
    versions.write_id_index(path, pl.Series(values))
    assert path.stat().st_size == 4 * 5000
    assert all(versions.index_may_hold(path, v) for v in values)
    others = [ids.generation_id("round_001", f"p{i}", 0) for i in range(5000)]
    assert sum(versions.index_may_hold(path, v) for v in others) <= 2  # ~0.006 expected
    versions.write_id_index(tmp_path / "empty.ids", pl.Series([], dtype=pl.String))
    assert not versions.index_may_hold(tmp_path / "empty.ids", values[0])


# --- the catalog -----------------------------------------------------------------------------


def test_catalog_views_equal_views_of_every_current_file(built):
    with catalog.connect(built.data_dir) as con, _full_scan(built) as scan:
        for table in ("generations", "critiques", "filtered", "refinements", "checkpoints"):
            ours = con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
            theirs = scan.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
            assert ours == theirs, table
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    assert {"generations", "refinements", "checkpoints", "eval_scores"} <= views
    assert "rollouts" not in views  # no round wrote one: no view


def test_a_new_round_changes_no_view(built, tmp_path):
    import shutil

    store = RoundStore(tmp_path / "var")
    shutil.copytree(built.data_dir, store.data_dir, symlinks=True)
    assert store.refresh_catalog().startswith("catalog refreshed")  # another place: rebuilt
    before = catalog.existing_views(store.data_dir)
    _bench().build_round(store, ROUNDS, 40)  # refreshes after each publish, as the assets do
    assert catalog.existing_views(store.data_dir) == before
    assert store.refresh_catalog().startswith("catalog up to date")
    with catalog.connect(store.data_dir) as con:
        rounds = con.execute("SELECT count(DISTINCT round) FROM generations").fetchone()[0]
    assert rounds == ROUNDS + 1


def test_a_query_of_one_round_opens_only_that_rounds_file(built):
    with catalog.connect(built.data_dir) as con:
        plan = con.execute(
            "EXPLAIN ANALYZE SELECT count(*) FROM generations WHERE round = 'round_002'"
        ).fetchall()[0][1]
    assert f"Scanning Files: 1/{ROUNDS}" in plan


def test_the_catalog_bounds_duckdbs_memory_and_spills_inside_the_data_dir(built):
    with catalog.connect(built.data_dir, memory_limit="300MB") as con:
        limit, temp = con.execute(
            "SELECT current_setting('memory_limit'), current_setting('temp_directory')"
        ).fetchone()
    assert limit.startswith("286") or limit.startswith("300")  # MiB or MB, by version
    assert Path(temp) == built.data_dir.resolve() / catalog.TEMP_DIR


def test_a_kill_between_pointer_and_links_is_repaired_by_a_resync(tmp_path):
    store = RoundStore(tmp_path)
    store.publish("round_000", "filtered", {"filtered": pl.DataFrame({"v": [1]})})
    old = catalog.link_path(tmp_path, "filtered", "round_000").readlink()
    # The next publish swapped the pointer, then died before its links.
    versions.publish_tables(
        tmp_path / "rounds/round_000/filtered", {"filtered": pl.DataFrame({"v": [2]})}
    )
    assert catalog.link_path(tmp_path, "filtered", "round_000").readlink() == old
    stale = store.collect_garbage()  # resyncs the links before deleting the old version
    assert len(stale) == 1
    store.refresh_catalog()
    with catalog.connect(tmp_path) as con:
        assert con.execute("SELECT v FROM filtered").fetchall() == [(2,)]


def test_gc_collects_a_dead_writers_temporary_link(tmp_path):
    store = RoundStore(tmp_path)
    store.publish("round_000", "filtered", {"filtered": pl.DataFrame({"v": [1]})})
    host = versions.temp_name("x").split("-")[-3]
    link = catalog.link_path(tmp_path, "filtered", "round_000")
    dead = link.with_name(f"{versions.TMP_PREFIX}filtered.parquet-{host}-999999-abcd")
    dead.symlink_to(link.readlink())  # a writer killed between symlink and rename
    assert store.collect_garbage(dry_run=True) == [dead]
    store.collect_garbage()
    assert not os.path.lexists(dead) and link.is_symlink()
