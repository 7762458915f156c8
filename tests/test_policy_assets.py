"""`promoted_policy` and `history` (assets/policy.py): materialized by Declarative
Automation when a round's eval_scores lands with its blocking checks passed, with the
promoted round, its accuracy and the reason; the history plot and table.

The round here is a stand-in (`eval_scores` writes a hand-written row, one blocking
gate), so a tick evaluates in a second; the policy assets are the real ones.
"""

from collections.abc import Iterator

import dagster as dg
import polars as pl
import pytest

from selfimprove_dagster.assets.loop import Loop, LoopSpec
from selfimprove_dagster.assets.policy import POLICY_AUTOMATION, policy_definitions
from selfimprove_dagster.resources.settings import GROUPS
from selfimprove_dagster.store.storage import RoundStore
from tests.conftest import STORES, StubStorageResource, StubStore

GATE = "check_no_regression_eval_scores"
# round -> (accuracy_before, accuracy_after); round_002 is the planted regression.
ACCURACY = {"round_000": (0.1, 0.5), "round_001": (0.5, 0.7), "round_002": (0.7, 0.4)}
LOOP = Loop("t")
ROUNDS = LOOP.partitions


@dg.asset(partitions_def=ROUNDS, key=LOOP.key("eval_scores"), required_resource_keys={"t_storage"})
def stand_in_eval_scores(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    store, round_ = context.resources.t_storage.store(), context.partition_key
    before, after = ACCURACY[round_]
    row = {
        "round": round_,
        "checkpoint": str(store.checkpoint_dir(round_)),
        "accuracy_before": before,
        "accuracy_after": after,
        "pass_at_k": after,
        "kept": 10,
    }
    store.write(round_, "eval_scores", pl.DataFrame([row]))
    return dg.MaterializeResult()


@dg.asset_check(asset=stand_in_eval_scores, name=GATE, blocking=True, partitions_def=ROUNDS)
def stand_in_gate(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    before, after = ACCURACY[context.partition_key]
    return dg.AssetCheckResult(passed=after >= before, severity=dg.AssetCheckSeverity.ERROR)


round_job = dg.define_asset_job(
    LOOP.job_name, selection=[stand_in_eval_scores], partitions_def=ROUNDS
)


@pytest.fixture
def store(tmp_path) -> RoundStore:
    # Stand-in rounds have no checkpoints: their chains verify by decree (`StubStore`).
    stub = StubStore(tmp_path / "var")
    STORES[str(stub.data_dir)] = stub
    return stub


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


def stand_in_loop(store: RoundStore) -> Loop:
    groups = {group: cls() for group, cls in GROUPS.items()}
    groups["storage"] = StubStorageResource(data_dir=str(store.data_dir))
    return Loop.of(LoopSpec("t", groups))


def policy(store: RoundStore):
    """(assets, job, sensor) of the stand-in loop's policy."""
    return policy_definitions(stand_in_loop(store), [stand_in_eval_scores], [stand_in_gate])


def definitions(store: RoundStore) -> dg.Definitions:
    assets, job, sensor = policy(store)
    return dg.Definitions(
        assets=[stand_in_eval_scores, *assets],
        asset_checks=[stand_in_gate],
        jobs=[round_job, job],
        sensors=[sensor],
        resources=stand_in_loop(store).resources(),
    )


def run_round(instance, store, round_: str) -> bool:
    instance.add_dynamic_partitions(ROUNDS.name, [round_])
    job = definitions(store).resolve_job_def(LOOP.job_name)
    return job.execute_in_process(
        instance=instance, partition_key=round_, raise_on_error=False
    ).success


def requested(instance, store, cursor=None):
    """One automation tick over the policy assets: (requested keys, next cursor)."""
    assets, _, _ = policy(store)
    result = dg.evaluate_automation_conditions(
        defs=definitions(store),
        instance=instance,
        asset_selection=dg.AssetSelection.assets(*assets),
        cursor=cursor,
    )
    keys = {asset.key.path[-1] for asset in assets if result.get_num_requested(asset.key)}
    return keys, result.cursor


def test_the_condition_is_eager(store):
    for asset in policy(store)[0]:
        assert asset.automation_conditions_by_key[asset.key] == POLICY_AUTOMATION
    assert POLICY_AUTOMATION.get_label() == "eager"


def test_requested_when_a_round_lands_with_its_gates_passed(instance, store):
    keys, cursor = requested(instance, store)
    assert keys == set()  # nothing landed yet
    assert run_round(instance, store, "round_000")
    keys, cursor = requested(instance, store, cursor)
    assert keys == {"promoted_policy", "history"}


def test_also_requested_after_a_round_whose_gate_failed(instance, store):
    """So neither is left Unsynced beside a materialized eval_scores: the failed round
    shows in the history as not done, and is never promoted."""
    assert run_round(instance, store, "round_000")
    assert run_round(instance, store, "round_001")
    _, cursor = requested(instance, store)
    assert not run_round(instance, store, "round_002")  # the regression gate fails
    keys, _ = requested(instance, store, cursor)
    assert keys == {"promoted_policy", "history"}


def test_metadata_names_the_promoted_round_its_accuracy_and_the_reason(instance, store):
    for round_ in ACCURACY:
        run_round(instance, store, round_)
    result = (
        definitions(store)
        .resolve_job_def(LOOP.policy_job_name)
        .execute_in_process(instance=instance)
    )
    promoted = result.asset_materializations_for_node("t__promoted_policy")[0].metadata
    assert promoted["promoted_round"].value == "round_001"
    assert promoted["accuracy"].value == pytest.approx(0.7)
    assert promoted["reason"].value.startswith(
        "round_001 has the best held-out accuracy 70.0% (up from 50.0%)"
    )
    # round_002 failed its gate: shown in the history, never promoted.
    row = pl.read_parquet(store.promoted_path).row(0, named=True)
    assert (row["round"], row["decided_after"]) == ("round_001", "round_001")
    shown = result.asset_materializations_for_node("t__history")[0].metadata
    assert shown["dagster/row_count"].value == 3
    assert shown["history"].value.startswith("![")
    assert "round_002" in shown["history_table"].value
    assert "| done" in shown["history_table"].value
    assert store.plot_path("history.png").is_file()


def test_no_rounds_yet_serves_the_base_model(instance, store):
    result = (
        definitions(store)
        .resolve_job_def(LOOP.policy_job_name)
        .execute_in_process(instance=instance)
    )
    promoted = result.asset_materializations_for_node("t__promoted_policy")[0].metadata
    assert promoted["promoted_round"].value == "none (base model)"
    assert promoted["reason"].value == "no completed rounds yet: serve the base model"


def test_the_code_location_runs_their_automation_sensor_by_default():
    from selfimprove_dagster.definitions import build_definitions

    repository = build_definitions().get_repository_def()
    sensors = {sensor.name: sensor for sensor in repository.sensor_defs}
    assert "default_automation_condition_sensor" not in sensors  # it would start stopped
    for loop in ("demo", "add2_grpo"):
        sensor = sensors[f"{loop}_policy_automation_sensor"]
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
        targeted = sensor.asset_selection.resolve(repository.asset_graph)
        assert targeted == {dg.AssetKey([loop, "promoted_policy"]), dg.AssetKey([loop, "history"])}


# --- the core functions the assets wrap (selfimprove_dagster/evolution.py) ----------


def rounds(*accuracies: tuple[float, float]) -> pl.DataFrame:
    keys = [f"round_{i:03d}" for i in range(len(accuracies))]
    return pl.DataFrame(
        {
            "round": keys,
            "checkpoint": [f"/ckpt/{key}" for key in keys],
            "accuracy_before": [before for before, _ in accuracies],
            "accuracy_after": [after for _, after in accuracies],
        }
    )


def test_promotion_picks_the_best_round_that_did_not_regress():
    from selfimprove_dagster.evolution import promotion

    chosen = promotion(rounds((0.1, 0.5), (0.5, 0.8), (0.8, 0.6)))  # round_002 regressed
    assert (chosen.round, chosen.checkpoint, chosen.accuracy) == (
        "round_001",
        "/ckpt/round_001",
        0.8,
    )
    assert chosen.decided_after == "round_002"
    assert chosen.frame().columns == ["round", "checkpoint", "accuracy", "decided_after", "reason"]


def test_promotion_serves_the_base_model_when_every_round_regressed():
    from selfimprove_dagster.evolution import promotion

    chosen = promotion(rounds((0.5, 0.2)))
    assert chosen.round is None
    assert chosen.reason == (
        "every round up to round_000 scored below its policy: serve the base model"
    )
    assert chosen.frame().row(0, named=True)["round"] is None


def test_history_table_marks_the_promoted_round():
    from selfimprove_dagster.evolution import history_table

    table = history_table(rounds((0.1, 0.5), (0.5, 0.8)), "round_001")
    assert table["promoted"].to_list() == [False, True]
    assert history_table(pl.DataFrame()).height == 0
