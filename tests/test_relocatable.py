"""A data dir does not depend on where it lives: a copy answers lineage and SQL from its
own files (even while the original changes, and after it is gone), a moved one answers
without a DuckDB traceback, and checkpoint chains verify against the copy's own
checkpoints. Built with the benchmark's builder through `RoundStore.publish`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest

from selfimprove_dagster.models import read_manifest
from selfimprove_dagster.store import catalog, lineage
from selfimprove_dagster.store.storage import RoundStore

ROUNDS, ROWS = 3, 80
SQL = "SELECT round, count(*) FROM generations GROUP BY round ORDER BY round"


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_catalog.py"
    spec = importlib.util.spec_from_file_location("bench_catalog", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> RoundStore:
    store = RoundStore(tmp_path_factory.mktemp("relocatable") / "var")
    bench = _bench()
    for index in range(ROUNDS):
        bench.build_round(store, index, ROWS)
    return store


def _answers(store: RoundStore) -> dict:
    kept = store.read("round_000", "filtered")["generation_id"][0]
    with catalog.connect(store.data_dir) as con:
        sql = con.execute(SQL).fetchall()
    return {
        "round": lineage.checkpoint_lineage(store, "round_002", limit=5),
        "id": lineage.generation_lineage(store, kept),
        "sql": sql,
    }


def _copy(original: RoundStore, to: Path, symlinks: bool) -> RoundStore:
    shutil.copytree(original.data_dir, to, symlinks=symlinks)
    return RoundStore(to)


@pytest.mark.parametrize("symlinks", [True, False], ids=["links kept", "links followed"])
def test_a_copy_answers_from_its_own_files_after_the_original_is_gone(original, tmp_path, symlinks):
    before = _answers(original)
    copy = _copy(original, tmp_path / "copy", symlinks)
    moved_away = tmp_path / "original-gone"
    os.rename(original.data_dir, moved_away)
    try:
        after = _answers(copy)
        assert after == before  # from the copy's files: the original's are gone
        for round_ in ("round_000", "round_001", "round_002"):
            assert copy.chain_problem(round_) is None  # verified against the copy's checkpoints
    finally:
        os.rename(moved_away, original.data_dir)


def test_a_copy_does_not_see_the_original_change(original, tmp_path):
    copy = _copy(original, tmp_path / "copy", symlinks=True)
    scratch = _copy(original, tmp_path / "scratch", symlinks=True)
    # The "original" publishes a new round_002 generations version after the copy.
    extra = scratch.read("round_002", "generations").head(7)
    scratch.publish("round_002", "generations", {"generations": extra})
    scratch.refresh_catalog()
    with catalog.connect(copy.data_dir) as con:
        assert con.execute(SQL).fetchall()[-1] == ("round_002", ROWS)
    with catalog.connect(scratch.data_dir) as con:
        assert con.execute(SQL).fetchall()[-1] == ("round_002", 7)


def test_a_moved_data_dir_answers_and_a_refresh_repoints_plain_duckdb(original, tmp_path):
    moved = _copy(original, tmp_path / "a", symlinks=True)
    os.rename(moved.data_dir, tmp_path / "b")  # the copy's first place is gone
    moved = RoundStore(tmp_path / "b")
    assert _answers(moved)["sql"] == [(f"round_{i:03d}", ROWS) for i in range(ROUNDS)]

    def plain_session_reads() -> str:
        """Where a plain DuckDB session on the moved catalog reads (the views' comment)."""
        with duckdb.connect(str(moved.catalog_path), read_only=True) as con:
            assert len(con.execute(SQL).fetchall()) == ROUNDS
            comment = "SELECT comment FROM duckdb_views() WHERE view_name = 'generations'"
            return con.execute(comment).fetchone()[0].removeprefix(catalog.SIGNATURE + " ")

    # Until something refreshes it, a plain session reads where the catalog was built...
    assert plain_session_reads() == str(original.data_dir.resolve())
    with duckdb.connect(str(moved.catalog_path), read_only=True) as con:
        con.execute(f"SET VARIABLE {catalog.ROOT_VARIABLE} = '{moved.data_dir}'")
        assert len(con.execute(SQL).fetchall()) == ROUNDS  # ...unless the variable says
    assert moved.refresh_catalog().startswith("catalog refreshed")
    assert plain_session_reads() == str(moved.data_dir.resolve())


def test_nothing_inside_names_the_data_dirs_absolute_path(original):
    root = str(original.data_dir.resolve())
    links = [p for p in (original.data_dir / catalog.LINKS_DIR).rglob("*") if p.is_symlink()]
    links += [p for p in original.checkpoints_dir.iterdir() if p.is_symlink()]
    assert links and all(not os.path.isabs(os.readlink(p)) for p in links)
    pointers = list(original.rounds_dir.rglob("current.json"))
    assert pointers and all(root not in p.read_text() for p in pointers)
    for round_ in ("round_001", "round_002"):
        manifest = read_manifest(original.checkpoint_dir(round_))
        assert manifest["trained_from"].startswith("../")
        assert manifest["parent"]["ref"].startswith("../")  # identities name siblings
        assert manifest["policy_identity"]["ref"].startswith("../")


def test_a_copy_verifies_its_chain_against_its_own_checkpoints_not_the_originals(
    original, tmp_path
):
    """An older manifest names its policy by absolute path: a copy whose own round holds
    the recorded adapter verifies against it, even while the original changed."""
    copy = _copy(original, tmp_path / "copy", symlinks=True)
    scratch = _copy(original, tmp_path / "scratch", symlinks=True)
    manifest_path = copy.checkpoint_dir("round_001") / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["policy_identity"]["ref"] = str(scratch.checkpoint_dir("round_000").resolve())
    manifest_path.write_text(json.dumps(manifest))
    _bench().publish_checkpoint(scratch, 0, None)  # "the original" re-trained round_000
    assert copy.chain_problem("round_001") is None


def test_lineage_over_a_damaged_data_dir_is_one_line(original, tmp_path):
    copy = _copy(original, tmp_path / "copy", symlinks=True)
    os.remove(copy.table_path("round_002", "generations"))
    with pytest.raises(Exception) as error:
        lineage.checkpoint_lineage(copy, "round_002")
    assert not isinstance(error.value, duckdb.Error)
    assert "\n" not in str(error.value) and "Fix:" in str(error.value)


def test_gc_and_the_catalog_keep_a_link_following_copy_consistent(original, tmp_path):
    """`shutil.copytree` without `symlinks=True` turns every link into a copy of its
    target: the copy still works, gc collects the version folders nothing links to
    any more, and the catalog's links become links again."""
    copy = _copy(original, tmp_path / "copy", symlinks=False)
    old = copy.current("round_001", "filtered").folder
    copy.publish("round_001", "filtered", {"filtered": pl.DataFrame({"round": ["round_001"]})})
    assert old in copy.collect_garbage()
    for round_ in ("round_000", "round_001", "round_002"):
        assert copy.has_checkpoint(round_) and copy.chain_problem(round_) is None
        assert catalog.link_path(copy.data_dir, "generations", round_).is_symlink()
    with catalog.connect(copy.data_dir) as con:
        assert con.execute(
            "SELECT count(*) FROM filtered WHERE round = 'round_001'"
        ).fetchone() == (1,)
        assert con.execute(SQL).fetchall() == [(f"round_{i:03d}", ROWS) for i in range(ROUNDS)]
