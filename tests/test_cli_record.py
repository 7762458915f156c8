"""`selfimprove run` decides which rounds are done from the instance, never from a file
(issue 12.4), refuses a second run of a round that is materializing (12.6), re-runs a
round whose checkpoint chain does not verify, and refreshes promoted_policy/history
after each round (15.2). The round job is a stand-in with the real job's name, so a
round takes a second; the policy assets are the real ones."""

import dagster as dg
import polars as pl
import pytest

from selfimprove_dagster import cli
from selfimprove_dagster.assets.loop import Loop
from selfimprove_dagster.assets.policy import policy_definitions
from selfimprove_dagster.errors import SelfImproveError
from tests.conftest import StubStore, loop_handle, stand_in_loop

GATE = "check_no_regression_eval_scores"
ACCURACY = {"round_000": (0.1, 0.5), "round_001": (0.5, 0.7), "round_002": (0.7, 0.4)}
LOOP = Loop("t")
ROUNDS = LOOP.partitions


@dg.asset(partitions_def=ROUNDS, key=LOOP.key("eval_scores"), required_resource_keys={"t_storage"})
def stand_in_eval_scores(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    store, round_ = context.resources.t_storage.store(), context.partition_key
    before, after = ACCURACY[round_]
    row = {"round": round_, "checkpoint": round_, "accuracy_before": before}
    store.write(round_, "eval_scores", pl.DataFrame([{**row, "accuracy_after": after}]))
    return dg.MaterializeResult()


@dg.asset_check(asset=stand_in_eval_scores, name=GATE, blocking=True, partitions_def=ROUNDS)
def stand_in_gate(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    before, after = ACCURACY[context.partition_key]
    return dg.AssetCheckResult(
        passed=after >= before, severity=dg.AssetCheckSeverity.ERROR, description="regressed"
    )


round_job = dg.define_asset_job(
    LOOP.job_name, selection=[stand_in_eval_scores], partitions_def=ROUNDS
)


@pytest.fixture
def store(cli_store) -> StubStore:
    return cli_store


@pytest.fixture
def defs(store) -> dg.Definitions:
    loop = stand_in_loop(store)
    policy, policy_job, _ = policy_definitions(loop, [stand_in_eval_scores], [stand_in_gate])
    return dg.Definitions(
        assets=[stand_in_eval_scores, *policy],
        asset_checks=[stand_in_gate],
        jobs=[round_job, policy_job],
        resources=loop.resources(),
    )


@pytest.fixture
def handle(defs, store) -> cli.LoopHandle:
    return loop_handle(defs, store)


def materializations(table: str) -> int:
    instance = dg.DagsterInstance.get()
    return len(instance.fetch_materializations(LOOP.key(table), limit=100).records)


def test_a_round_whose_file_exists_but_was_never_recorded_is_run(handle, store, capsys):
    # Planted: round_000's row is on disk (a file left by a run that died).
    store.write("round_000", "eval_scores", pl.DataFrame([{"round": "round_000"}]))
    assert cli._run_rounds(handle, 1) == 0
    out = capsys.readouterr().out
    assert "round_000: running (" in out
    assert "promoted policy: round_000 has the best held-out accuracy 50.0%" in out
    assert materializations("promoted_policy") == materializations("history") == 1

    assert cli._run_rounds(handle, 1) == 0  # done now, as recorded
    assert "round_000: already complete, skipping" in capsys.readouterr().out


@pytest.fixture
def no_policy_refresh(monkeypatch):
    """The policy assets draw a matplotlib plot (seconds): off where not under test."""
    monkeypatch.setattr(cli, "refresh_policy", lambda handle, instance: None)


@pytest.mark.usefixtures("no_policy_refresh")
def test_a_round_whose_gate_failed_is_not_done(handle, store, capsys, monkeypatch):
    monkeypatch.setitem(ACCURACY, "round_000", (0.5, 0.2))  # planted: a regression
    assert cli._run_rounds(handle, 1) == 1  # its blocking gate fails
    err = capsys.readouterr().err
    assert "round_000 failed: gate check_no_regression_eval_scores failed" in err
    assert cli._run_rounds(handle, 1) == 1  # not skipped as "complete" next time
    out = capsys.readouterr().out
    assert "round_000: running again (a blocking gate failed in round_000: " in out


@pytest.mark.usefixtures("no_policy_refresh")
def test_a_done_round_whose_chain_broke_runs_again(handle, store, capsys):
    assert cli._run_rounds(handle, 1) == 0
    store.broken["round_000"] = "its base model changed since it was trained"
    # Status, promotion, policy=best and the sensor read the same "done": not done now.
    state = cli.dagster_record(handle).round("round_000")
    assert not state.done
    assert cli.gate_summary(state) == "stale: its base model changed since it was trained"
    capsys.readouterr()
    assert cli._run_rounds(handle, 1) == 0
    out = capsys.readouterr().out
    assert "round_000: running again (its base model changed since it was trained)" in out


def test_a_second_run_of_a_materializing_round_is_refused(handle, defs, store):
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(ROUNDS.name, ["round_000"])
    run = instance.create_run_for_job(
        job_def=defs.resolve_job_def(LOOP.job_name),
        status=dg.DagsterRunStatus.STARTED,
        tags={"dagster/partition": "round_000"},
    )
    with pytest.raises(SelfImproveError) as error:
        cli._run_rounds(handle, 1)
    assert str(error.value).startswith(
        f"round_000 is already being materialized by run {run.run_id[:8]} (STARTED)"
    )


# --- order and concurrency (issue 12.6) -----------------------------------------------


@dg.asset(partitions_def=ROUNDS, key=LOOP.key("prompts"), required_resource_keys={"t_storage"})
def stand_in_first_step(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    from selfimprove_dagster.assets.record import check_round_order

    check_round_order(LOOP.step(context))  # what the real `prompts` does first
    return dg.MaterializeResult()


def test_a_backfilled_round_refuses_to_start_before_its_parent_is_done(store):
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(ROUNDS.name, ["round_000", "round_001"])
    job = dg.define_asset_job("first_step", selection=[stand_in_first_step], partitions_def=ROUNDS)
    resources = stand_in_loop(store).resources()
    resolved = dg.Definitions(
        assets=[stand_in_first_step], jobs=[job], resources=resources
    ).resolve_job_def("first_step")
    result = resolved.execute_in_process(
        instance=instance,
        partition_key="round_001",
        tags={"dagster/backfill": "bkfl0001"},
        raise_on_error=False,
    )
    assert not result.success
    assert cli.run_failure_message(result) == (
        "selfimprove_dagster.errors.SelfImproveError: Backfill bkfl0001 reached round_001 but "
        "its parent round_000 is not done (round_000 has no recorded eval_scores "
        "materialization). Fix: fix and re-run round_000 first, then backfill from round_001; "
        "or run `selfimprove run --loop t --rounds 2`, which runs rounds in order"
    )
    # Outside a backfill (a person launching one round), no order is imposed here.
    assert resolved.execute_in_process(instance=instance, partition_key="round_001").success


def test_every_model_loading_step_is_in_the_model_pool():
    from selfimprove_dagster.assets.rounds import round_assets
    from selfimprove_dagster.profiles import MODEL_POOL
    from tests.conftest import loop_definitions

    _, loop = loop_definitions({})
    pools = {asset.op.name.removeprefix("t_"): asset.op.pool for asset in round_assets(loop)}
    loading = ["prompts", "generations", "critiques", "checkpoint", "eval_scores"]
    assert {name: pools[name] for name in loading} == dict.fromkeys(loading, MODEL_POOL)
    assert pools["filtered"] is None  # Parquet only: never waits for a model


def test_status_reads_summaries_with_the_answers_of_the_full_tables(tmp_path):
    """`status` reads the pointers' row counts and one generation's temperature, never
    the whole tables: on a small data dir it gives what reading them gives."""
    from selfimprove_dagster.evolution import RoundState
    from selfimprove_dagster.store.storage import RoundStore

    store = StubStore(tmp_path / "summary")
    for index, (kept, temperature) in enumerate([(3, 0.6), (5, 1.0)]):
        key = f"round_00{index}"
        generations = pl.DataFrame(
            {"generation_id": [f"g{index}{i}" for i in range(8)], "temperature": [temperature] * 8}
        )
        store.publish(key, "generations", {"generations": generations})
        filtered = pl.DataFrame({"generation_id": [f"g{index}{i}" for i in range(kept)]})
        store.publish(key, "filtered", {"filtered": filtered})
        row = {"round": key, "policy": "base", "accuracy_before": 0.1, "accuracy_after": 0.2,
               "pass_at_k": 0.3, "k": 4}  # fmt: skip
        store.publish(key, "eval_scores", {"eval_scores": pl.DataFrame([row])})

    class Record:  # what Dagster recorded: both rounds done
        def rounds(self):
            return ["round_000", "round_001"]

        def round(self, key):
            return RoundState(key, materialized=True)

    handle = cli.LoopHandle(None, LOOP, {}, store)
    rows = cli.status_rows(handle, Record())
    full = RoundStore(store.data_dir)  # the full-table answers
    for row in rows:
        assert row["kept"] == full.read(row["round"], "filtered").height
        assert row["temperature"] == full.read(row["round"], "generations")["temperature"][0]
    assert [r["kept"] for r in rows] == [3, 5]
