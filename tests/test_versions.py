"""One consistent version per round and step: sets published together, tables a step
did not write are not current, the catalog sees current versions only, gc, corrupt
files, and checkpoint folders published behind a link."""

from __future__ import annotations

import json
import os

import duckdb
import polars as pl
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.store import versions
from selfimprove_dagster.store.storage import RoundStore


def _frame(tag: str, rows: int = 3) -> pl.DataFrame:
    return pl.DataFrame({"round": ["round_000"] * rows, "tag": [tag] * rows})


def test_a_step_publishes_its_tables_as_one_set(tmp_path):
    store = RoundStore(tmp_path)
    first = store.publish(
        "round_000",
        "prompts",
        {"prompts": _frame("a"), "prompt_mix": _frame("a"), "prompt_candidates": _frame("a")},
        run_id="run-1",
    )
    assert first.row_counts == {"prompts": 3, "prompt_mix": 3, "prompt_candidates": 3}
    assert store.read("round_000", "prompt_candidates")["tag"][0] == "a"
    # Re-materialized without self_instruct: the old candidates are no longer current.
    second = store.publish(
        "round_000", "prompts", {"prompts": _frame("b"), "prompt_mix": _frame("b")}
    )
    assert second.version != first.version
    assert store.read("round_000", "prompts")["tag"][0] == "b"
    assert not store.has("round_000", "prompt_candidates")
    with pytest.raises(SelfImproveError, match="has no current `prompt_candidates`"):
        store.read("round_000", "prompt_candidates")
    assert first.path("prompt_candidates").is_file()  # kept until gc


def test_catalog_drops_a_table_the_latest_version_did_not_write(tmp_path):
    store = RoundStore(tmp_path)
    store.publish("round_000", "critiques", {"critiques": _frame("a"), "refinements": _frame("a")})
    store.refresh_catalog()
    store.publish("round_000", "critiques", {"critiques": _frame("b")})
    store.refresh_catalog()
    with duckdb.connect(str(store.catalog_path), read_only=True) as con:
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        tags = con.execute("SELECT DISTINCT tag FROM critiques").fetchall()
    assert "refinements" not in views
    assert tags == [("b",)]


def test_a_step_refuses_tables_it_does_not_write(tmp_path):
    with pytest.raises(ValueError, match="does not write"):
        RoundStore(tmp_path).publish("round_000", "generations", {"filtered": _frame("a")})


def test_data_version_is_the_content_hash(tmp_path):
    store = RoundStore(tmp_path)
    store.write("round_000", "filtered", _frame("a"))
    first = store.data_version("round_000", "filtered")
    store.write("round_000", "filtered", _frame("a"))  # same rows: same data version
    assert store.data_version("round_000", "filtered") == first
    store.write("round_000", "filtered", _frame("b"))
    assert store.data_version("round_000", "filtered") != first
    assert store.data_version("round_000", "eval_scores") is None


def test_versions_record_their_run_and_are_unique(tmp_path):
    store = RoundStore(tmp_path)
    ids = {
        store.publish("round_000", "filtered", {"filtered": _frame("a")}, run_id="abcd-ef").version
        for _ in range(5)
    }
    assert len(ids) == 5
    pointer = json.loads((tmp_path / "rounds/round_000/filtered/current.json").read_text())
    assert pointer["run_id"] == "abcd-ef" and pointer["version"] in ids


def test_gc_removes_only_what_no_reader_sees(tmp_path):
    store = RoundStore(tmp_path)
    old = store.publish("round_000", "filtered", {"filtered": _frame("a")})
    new = store.publish("round_000", "filtered", {"filtered": _frame("b")})
    # A legacy (pre-version) file of a step that now has versions, and a temp folder
    # left by a writer that died (pid 999999 does not exist).
    legacy = tmp_path / "rounds/round_000/filtered.parquet"
    _frame("legacy").write_parquet(legacy)
    host = versions.temp_name("x").split("-")[-3]
    dead = tmp_path / f"rounds/round_000/filtered/.tmp-v-{host}-999999-abcd"
    dead.mkdir()
    live = tmp_path / "rounds/round_000/filtered" / versions.temp_name("v")  # our pid: alive
    live.mkdir()

    listed = store.collect_garbage(dry_run=True)
    assert set(listed) == {old.folder, legacy, dead}
    assert old.folder.is_dir() and legacy.is_file()  # dry run deletes nothing
    assert store.collect_garbage() == listed
    assert not old.folder.exists() and not legacy.exists() and not dead.exists()
    assert live.is_dir() and new.folder.is_dir()
    assert store.read("round_000", "filtered")["tag"][0] == "b"
    assert store.collect_garbage(dry_run=True) == []


def test_legacy_round_files_are_read_until_the_step_has_a_version(tmp_path):
    store = RoundStore(tmp_path)
    legacy = tmp_path / "rounds/round_000/eval_scores.parquet"
    legacy.parent.mkdir(parents=True)
    _frame("legacy").write_parquet(legacy)
    assert store.read("round_000", "eval_scores")["tag"][0] == "legacy"
    assert store.has("round_000", "eval_scores")
    store.publish("round_000", "eval_scores", {"eval_details": _frame("new")})
    assert not store.has("round_000", "eval_scores")  # the new version has no eval_scores


def test_a_corrupt_parquet_file_is_one_line_with_the_fix(tmp_path):
    store = RoundStore(tmp_path)
    path = store.write("round_000", "generations", _frame("a"))
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SelfImproveError) as error:
        store.read("round_000", "generations")
    message = str(error.value)
    assert "\n" not in message
    assert "is not a readable Parquet file" in message
    assert "Fix: re-materialize `generations` for round_000" in message


def test_an_unreadable_pointer_is_one_line_with_the_fix(tmp_path):
    store = RoundStore(tmp_path)
    store.write("round_000", "filtered", _frame("a"))
    (tmp_path / "rounds/round_000/filtered/current.json").write_text("{not json")
    with pytest.raises(SelfImproveError, match="unreadable.*Fix: delete it and re-materialize"):
        store.read("round_000", "filtered")


def test_round_keys_never_become_paths(tmp_path):
    with pytest.raises(SelfImproveError, match="not a round partition key"):
        RoundStore(tmp_path).read("../../etc", "filtered")


def _checkpoint(folder, tag: str) -> None:
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(tag.encode())
    (folder / "manifest.json").write_text(json.dumps({"round": "round_000", "tag": tag}))


def test_checkpoints_publish_behind_a_stable_link(tmp_path):
    store = RoundStore(tmp_path)
    first = store.checkpoint_staging("round_000")
    other = store.checkpoint_staging("round_000")
    assert first != other  # two runs of one round never share a temporary folder
    _checkpoint(first, "one")
    v1 = store.publish_checkpoint("round_000", first)
    assert store.has_checkpoint("round_000")
    assert store.checkpoint_version_dir("round_000") == v1
    _checkpoint(other, "two")
    v2 = store.publish_checkpoint("round_000", other)
    link = store.checkpoint_dir("round_000")
    assert link.is_symlink() and os.readlink(link) == v2.name
    assert json.loads((link / "manifest.json").read_text())["tag"] == "two"
    assert store.checkpoint_ref("round_000") == str(link.absolute())
    assert v1.is_dir()  # the old version stays until gc
    assert store.collect_garbage() == [v1]
    assert not v1.exists() and store.has_checkpoint("round_000")


def test_a_pre_version_checkpoint_folder_becomes_an_old_version(tmp_path):
    store = RoundStore(tmp_path)
    legacy = store.checkpoint_dir("round_000")
    legacy.mkdir(parents=True)
    _checkpoint(legacy, "legacy")
    staging = store.checkpoint_staging("round_000")
    _checkpoint(staging, "new")
    store.publish_checkpoint("round_000", staging)
    assert json.loads((legacy / "manifest.json").read_text())["tag"] == "new"
    kept = [p for p in store.checkpoints_dir.iterdir() if "@legacy-" in p.name]
    assert len(kept) == 1 and (kept[0] / "adapter_model.safetensors").read_bytes() == b"legacy"


def test_generation_policy_names_the_round_of_a_checkpoint_version(tmp_path):
    store = RoundStore(tmp_path)
    version = str(store.checkpoints_dir / "round_004@20261201T000000-local-abcd")
    store.write("round_005", "generations", pl.DataFrame({"policy": [version]}))
    assert store.generation_policy("round_005") == (version, "round_004")


def test_gc_command_lists_then_deletes(tmp_path, capsys, monkeypatch):
    from selfimprove_dagster.cli import main

    # The CLI points these at its data dir; restore them after the test.
    monkeypatch.setenv("SELFIMPROVE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))

    store = RoundStore(tmp_path)
    old = store.publish("round_000", "filtered", {"filtered": _frame("a")})
    store.publish("round_000", "filtered", {"filtered": _frame("b")})
    assert main(["--data-dir", str(tmp_path), "gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would delete rounds/round_000/filtered/{old.version}" in out
    assert old.folder.is_dir()
    assert main(["gc", "--data-dir", str(tmp_path)]) == 0
    assert "deleted 1 old version(s)" in capsys.readouterr().out
    assert not old.folder.exists() and store.read("round_000", "filtered")["tag"][0] == "b"


# --- a full disk ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only: the test is skipped elsewhere, and says so)."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: the full-disk publish test is skipped")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]
    done = subprocess.run(mount, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): full-disk test skipped")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _ids_frame(rows: int, seed: int) -> pl.DataFrame:
    import random

    rng = random.Random(seed)  # random hex: Parquet cannot compress it below the disk size
    return pl.DataFrame(
        {
            "round": "round_000",
            "generation_id": [f"{rng.getrandbits(64):016x}" for _ in range(rows)],
        }
    )


def test_a_full_disk_publish_is_one_line_and_keeps_the_previous_version(small_disk):
    store = RoundStore(small_disk)
    first = store.publish("round_000", "generations", {"generations": _ids_frame(100, 0)})
    step = small_disk / "rounds/round_000/generations"
    with pytest.raises(SelfImproveError) as error:
        store.publish("round_000", "generations", {"generations": _ids_frame(200_000, 1)})
    message = str(error.value)
    assert "\n" not in message
    assert "No space left on device" in message and str(step) in message
    assert "needed about" in message and "free there" in message
    assert "Fix: free space on that disk (`selfimprove gc` removes old versions)" in message
    assert not [p for p in step.iterdir() if p.name.startswith(versions.TMP_PREFIX)]
    assert store.current("round_000", "generations").version == first.version
    assert store.read("round_000", "generations").equals(_ids_frame(100, 0))
    # Once there is space, the next publish goes through.
    second = store.publish("round_000", "generations", {"generations": _ids_frame(200, 2)})
    assert store.current("round_000", "generations").version == second.version


def test_a_pointer_that_does_not_fit_leaves_the_old_one(small_disk):
    pointer = small_disk / "current.json"
    pointer.write_text('{"version": "old"}')
    with pytest.raises(SelfImproveError, match=r"No space left on device.*needed about 2 MiB"):
        versions.replace_file_atomic(pointer, b"x" * (2 << 20))
    assert pointer.read_text() == '{"version": "old"}'
    assert [p.name for p in small_disk.iterdir()] == ["current.json"]
