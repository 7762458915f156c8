"""Two real rounds on the real embedded model (SmolLM2-135M), small sizes, through the
CLI and the Dagster round job: the path `make demo` takes, minus the size."""

from __future__ import annotations

import json

import duckdb
import polars as pl
import pytest

from selfimprove_dagster import cli
from selfimprove_dagster.store.storage import RoundStore

SMALL_ROUND = {
    "SELFIMPROVE_N_TRAIN": "24",
    "SELFIMPROVE_N_EVAL": "16",
    "SELFIMPROVE_SAMPLES_PER_PROMPT": "2",
    "SELFIMPROVE_PASS_AT_K_PROMPTS": "4",
    "SELFIMPROVE_EVAL_SAMPLES_PER_PROMPT": "2",
    "SELFIMPROVE_EPOCHS": "1",
    "SELFIMPROVE_BATCH_SIZE": "8",
}


@pytest.mark.slow
def test_two_real_rounds_from_the_cli(models_dir, tmp_path, monkeypatch, capsys):
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(models_dir)  # reuse the session's conversion
    for name, value in SMALL_ROUND.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DAGSTER_HOME", str(data_dir / "dagster_home"))
    monkeypatch.setenv("SELFIMPROVE_DATA_DIR", str(data_dir))

    assert cli.main(["--data-dir", str(data_dir), "run", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "round_000" in out and "round_001" in out and "acc after" in out

    store = RoundStore(data_dir)
    assert cli.dagster_record(cli.open_loop()).done_rounds() == ["round_000", "round_001"]
    manifest = json.loads((store.checkpoint_dir("round_001") / "manifest.json").read_text())
    assert manifest["trained_from"] == "../round_000"  # continues from the round's policy
    assert manifest["base_model"] == "embedded:smollm2-135m-instruct"
    assert manifest["optimizer_steps"] == manifest["planned_steps"] > 0

    # Status from the CLI, machine-readable.
    assert cli.main(["--data-dir", str(data_dir), "status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in rows] == ["round_000", "round_001"]
    assert rows[1]["accuracy_before"] == pytest.approx(rows[0]["accuracy_after"])
    assert all(0.0 <= r["accuracy_after"] <= 1.0 for r in rows)

    # Lineage: a filtered row of round_001 -> its generation -> the policy -> its prompt.
    with duckdb.connect(str(store.catalog_path), read_only=True) as con:
        lineage = con.execute(
            """
            SELECT g.policy, p.prompt, p.answer, f.completion
            FROM filtered f
            JOIN generations g USING (generation_id)
            JOIN prompts p ON p.prompt_id = f.prompt_id AND p.round = f.round
            WHERE f.round = 'round_001'
            """
        ).fetchall()
    assert lineage, "round_001 kept no samples"
    assert all(policy.endswith("checkpoints/round_000") for policy, *_ in lineage)

    # `selfimprove lineage`: what round_001's checkpoint was trained on.
    assert cli.main(["--data-dir", str(data_dir), "lineage", "round_001", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert len(found["trained_on"]) == len(lineage)
    assert {r["round"] for r in found["trained_on"]} == {"round_001"}

    # The Dagster instance saw both runs (what `make ui` shows).
    import dagster as dg

    instance = dg.DagsterInstance.get()
    assert instance.get_dynamic_partitions("demo_rounds") == ["round_000", "round_001"]
    assert instance.get_dynamic_partitions("add2_grpo_rounds") == []  # another loop's
    runs = instance.get_runs(filters=dg.RunsFilter(job_name="demo_round_job"))
    assert len(runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    # The comparison across loops was rebuilt after each round.
    experiments = pl.read_parquet(data_dir / "experiments.parquet")
    assert experiments.filter(loop="demo")["round"].to_list() == ["round_000", "round_001"]


def test_round_one_alone_is_refused_with_the_fix(models_dir, tmp_path, monkeypatch, capsys):
    """Asking for round_001 when round_000 has no checkpoint fails before any model loads."""
    data_dir = tmp_path / "var"
    monkeypatch.setenv("DAGSTER_HOME", str(data_dir / "dagster_home"))
    monkeypatch.setenv("SELFIMPROVE_DATA_DIR", str(data_dir))  # restored after the test
    store = cli.use_data_dir(str(data_dir))
    import dagster as dg

    dg.DagsterInstance.get().add_dynamic_partitions("demo_rounds", ["round_001"])
    from selfimprove_dagster.definitions import build_definitions

    result = (
        build_definitions()
        .resolve_job_def("demo_round_job")
        .execute_in_process(
            partition_key="round_001", instance=dg.DagsterInstance.get(), raise_on_error=False
        )
    )
    assert not result.success
    message = cli.run_failure_message(result)
    assert "round_000 has no checkpoint" in message and "Fix:" in message
    assert not store.has("round_001", "generations")
