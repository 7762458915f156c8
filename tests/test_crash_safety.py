"""Atomic publish under kill -9: a subprocess publishes round tables and checkpoints in
a loop and is killed with SIGKILL at many instants; the round then reads either the
old or the new complete set, never a mix, never nothing, and no temporary folder is
current. Two writers of one round at once never clobber each other."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import polars as pl
import pytest

from selfimprove_dagster.store.storage import RoundStore

ROWS = 20_000  # per table: big enough that a kill lands inside a write now and then
TABLES = ("prompts", "prompt_mix", "prompt_candidates")
FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json")

# The writer: publishes version after version of the round's `prompts` step (three
# tables) and of its checkpoint (three files), each tagged with its iteration.
WRITER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import polars as pl
    from selfimprove_dagster.store.storage import RoundStore

    store = RoundStore(Path(sys.argv[1]))
    offset, iterations = int(sys.argv[2]), int(sys.argv[3])
    rows = int(sys.argv[4])
    print("started", flush=True)
    i = 0
    while iterations == 0 or i < iterations:
        i += 1
        tag = offset + i
        frame = pl.DataFrame({"tag": [tag] * rows, "x": list(range(rows))})
        store.publish("round_000", "prompts", {t: frame for t in
                      ("prompts", "prompt_mix", "prompt_candidates")})
        staging = store.checkpoint_staging("round_000")
        for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
            (staging / name).write_text(json.dumps({"tag": tag, "pad": "x" * 200_000}))
        (staging / "manifest.json").write_text(json.dumps({"tag": tag}))
        store.publish_checkpoint("round_000", staging)
    """
)


def _start_writer(data_dir, offset: int = 0, iterations: int = 0) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(data_dir), str(offset), str(iterations), str(ROWS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "started"
    return process


def _seed(store: RoundStore) -> None:
    """Version 0 of the tables and the checkpoint, before any writer starts."""
    frame = pl.DataFrame({"tag": [0] * ROWS, "x": list(range(ROWS))})
    store.publish("round_000", "prompts", {t: frame for t in TABLES})
    staging = store.checkpoint_staging("round_000")
    for name in (*FILES, "manifest.json"):
        (staging / name).write_text(json.dumps({"tag": 0}))
    store.publish_checkpoint("round_000", staging)


def _assert_one_complete_version(store: RoundStore) -> tuple[int, int]:
    """Every table of the current set has the same tag and all its rows; the checkpoint
    link names a complete folder; nothing current is a temporary name."""
    tags = set()
    for table in TABLES:
        frame = store.read("round_000", table)
        assert frame.height == ROWS, table
        tags |= set(frame["tag"].unique().to_list())
    assert len(tags) == 1, f"tables from different versions: {tags}"
    current = store.current("round_000", "prompts")
    assert not current.version.startswith(".tmp-") and current.folder.is_dir()
    link = store.checkpoint_dir("round_000")
    assert link.is_symlink() and not os.readlink(link).startswith(".tmp-")
    checkpoint_tags = {
        json.loads((link / name).read_text())["tag"] for name in (*FILES, "manifest.json")
    }
    assert len(checkpoint_tags) == 1, f"checkpoint files from different versions: {checkpoint_tags}"
    return tags.pop(), checkpoint_tags.pop()


def test_kill_9_during_publish_leaves_the_old_or_the_new_version(tmp_path):
    store = RoundStore(tmp_path)
    _seed(store)
    rng = random.Random(0)
    last = (0, 0)
    delays = [0.0, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.25, 0.4]
    outcomes = []
    for n, delay in enumerate(delays, start=1):
        offset = 1000 * n  # this writer publishes tags offset+1, offset+2, ...
        writer = _start_writer(tmp_path, offset=offset)
        time.sleep(delay + rng.uniform(0, 0.02))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        now = _assert_one_complete_version(store)
        for tag, before in zip(now, last, strict=True):
            assert tag == before or tag > offset, (delay, tag, before)  # old, or new
        outcomes.append("new" if now != last else "old")
        last = now
    assert "new" in outcomes  # the kills did not all land before the first publish
    # The dead writers' temporary folders are garbage, and gc removes them.
    store.collect_garbage()
    leftovers = [
        p
        for root in (store.checkpoints_dir, tmp_path / "rounds" / "round_000" / "prompts")
        for p in root.iterdir()
        if p.name.startswith(".tmp-")
    ]
    assert leftovers == []
    assert _assert_one_complete_version(store) == last


def test_two_writers_of_one_round_never_clobber_each_other(tmp_path):
    store = RoundStore(tmp_path)
    _seed(store)
    writers = [_start_writer(tmp_path, offset=o, iterations=8) for o in (100, 200)]
    for writer in writers:
        assert writer.wait(timeout=120) == 0  # no writer tripped over the other's files
    tables_tag, checkpoint_tag = _assert_one_complete_version(store)
    assert tables_tag in {108, 208} and checkpoint_tag in {108, 208}
    versions = [p for p in (tmp_path / "rounds/round_000/prompts").iterdir() if p.is_dir()]
    assert len(versions) == 1 + 16  # every publish kept its own folder


@pytest.mark.parametrize("step", ["prompts"])
def test_a_kill_before_the_pointer_swap_keeps_the_old_set(tmp_path, monkeypatch, step):
    """Deterministic: the writer dies after writing every file but before the swap."""
    from selfimprove_dagster.store import versions

    store = RoundStore(tmp_path)
    _seed(store)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for the kill at that instant

    monkeypatch.setattr(versions, "replace_file_atomic", die)
    frame = pl.DataFrame({"tag": [1] * ROWS, "x": list(range(ROWS))})
    with pytest.raises(KeyboardInterrupt):
        store.publish("round_000", step, {t: frame for t in TABLES})
    assert _assert_one_complete_version(store)[0] == 0
