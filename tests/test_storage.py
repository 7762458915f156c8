"""Round keys, the previous-round policy lookup, versioned writes and the DuckDB catalog
(tests/test_versions.py covers version sets and gc, tests/test_crash_safety.py kills)."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import polars as pl
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.store.storage import RoundStore, previous_round, round_index, round_key


def test_round_keys():
    assert round_key(0) == "round_000"
    assert round_index("round_012") == 12
    assert previous_round("round_001") == "round_000"
    assert previous_round("round_000") is None
    with pytest.raises(SelfImproveError, match="not a round partition key"):
        round_index("2024-01-01")


def test_round_zero_uses_the_base_model(tmp_path):
    assert RoundStore(tmp_path).policy_for("round_000", "base") == ("base", None)


def test_round_n_without_previous_checkpoint_fails_with_the_fix(tmp_path):
    with pytest.raises(SelfImproveError) as error:
        RoundStore(tmp_path).policy_for("round_002", "base")
    message = str(error.value)
    assert "round_001 has no checkpoint" in message
    assert "Fix: materialize round_001 first" in message


def test_round_n_uses_previous_checkpoint(tmp_path):
    store = RoundStore(tmp_path)
    ckpt = store.checkpoint_dir("round_000")
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    (ckpt / "adapter_config.json").write_text("{}")
    assert store.policy_for("round_001", "base") == (str(ckpt.absolute()), "round_000")


def test_writes_are_versions_and_leave_no_temporary_files(tmp_path):
    store = RoundStore(tmp_path)
    first = store.write("round_000", "filtered", pl.DataFrame({"a": [1]}))
    second = store.write("round_000", "filtered", pl.DataFrame({"a": [2]}))
    assert store.read("round_000", "filtered")["a"].to_list() == [2]
    assert pl.read_parquet(first)["a"].to_list() == [1]  # the old version stays (until gc)
    step_dir = second.parent.parent  # rounds/round_000/filtered/<version>/filtered.parquet
    assert step_dir == tmp_path / "rounds" / "round_000" / "filtered"
    names = sorted(p.name for p in step_dir.iterdir())
    assert names == sorted([first.parent.name, second.parent.name, "current.json"])


def test_reading_a_missing_table_names_the_step_to_run(tmp_path):
    with pytest.raises(SelfImproveError, match="materialize `critiques` for round_003"):
        RoundStore(tmp_path).read("round_003", "critiques")


def test_catalog_views_span_rounds(tmp_path):
    store = RoundStore(tmp_path)
    store.write("round_000", "generations", pl.DataFrame({"round": ["round_000"], "x": [1]}))
    store.write("round_001", "generations", pl.DataFrame({"round": ["round_001"], "x": [2]}))
    store.refresh_catalog()
    with duckdb.connect(str(store.catalog_path), read_only=True) as con:
        rows = con.execute("SELECT round, x FROM generations ORDER BY round").fetchall()
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    assert rows == [("round_000", 1), ("round_001", 2)]
    assert "generations" in views and "filtered" not in views  # no files, no view


def test_catalog_reads_only_current_versions(tmp_path):
    store = RoundStore(tmp_path)
    store.write("round_000", "filtered", pl.DataFrame({"round": ["round_000"], "v": [1]}))
    store.write("round_000", "filtered", pl.DataFrame({"round": ["round_000"], "v": [2]}))
    store.write("round_001", "filtered", pl.DataFrame({"round": ["round_001"], "v": [1]}))
    store.refresh_catalog()
    with duckdb.connect(str(store.catalog_path), read_only=True) as con:
        rows = con.execute("SELECT round, v FROM filtered ORDER BY round").fetchall()
    assert rows == [("round_000", 2), ("round_001", 1)]


def test_catalog_in_use_elsewhere_does_not_fail_the_round(tmp_path):
    store = RoundStore(tmp_path)
    store.write("round_000", "filtered", pl.DataFrame({"round": ["round_000"]}))
    store.refresh_catalog()
    # Another process holds the DuckDB file open for writing (e.g. a user's shell).
    hold = (
        f"import duckdb, time; c = duckdb.connect({str(store.catalog_path)!r}); "
        "print('ok', flush=True); time.sleep(30)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert store.refresh_catalog().startswith("catalog not refreshed")
    finally:
        holder.kill()
