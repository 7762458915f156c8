"""The round assets through Dagster: a scripted engine (test-only fake) stands in for
generation so the plumbing runs in seconds; training is real LoRA on a tiny model."""

from __future__ import annotations

import dagster as dg
import duckdb
import pytest

from selfimprove_dagster.assets.checks import GATES, RL_ONLY_CHECKS
from selfimprove_dagster.assets.critique import critiques_asset
from selfimprove_dagster.resources import (
    EvolutionResource,
    GatesResource,
    GeneratorResource,
    MethodResource,
    StorageResource,
    TaskResource,
    TrainerResource,
)
from selfimprove_dagster.store.storage import RoundStore
from tests.conftest import ScriptedEngine, loop_definitions, materialize_round, node


class ScriptedGenerator(GeneratorResource):
    wrong_always: bool = False

    def load(self, model_ref, models_dir):
        engine = ScriptedEngine(model_ref)
        if self.wrong_always:
            generate = engine.generate

            def always_wrong(prompts, n, sampling, log=None):
                return [
                    c.__class__(**{**c.__dict__, "text": "no idea"})
                    for c in generate(prompts, n, sampling)
                ]

            engine.generate = always_wrong
        return engine


def _resources(data_dir, tiny_model, task=None, method=None, **generator):
    return {
        "storage": StorageResource(data_dir=str(data_dir)),
        "task": task
        or TaskResource(n_train=8, n_eval=6, eval_samples_per_prompt=2, pass_at_k_prompts=4),
        "generator": ScriptedGenerator(base_model=tiny_model, samples_per_prompt=2, **generator),
        "trainer": TrainerResource(epochs=1, batch_size=4, lora_r=4, lora_alpha=8),
        "gates": GatesResource(),
        "evolution": EvolutionResource(),
        "method": method or MethodResource(),
    }


def _materialize(key, resources, instance):
    return materialize_round(resources, key, instance)


@pytest.fixture(scope="module")
def two_rounds(tiny_model, models_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("var")
    (data_dir / "models").symlink_to(models_dir)
    instance = dg.DagsterInstance.ephemeral()
    resources = _resources(data_dir, tiny_model)
    results = [_materialize(k, resources, instance) for k in ("round_000", "round_001")]
    return RoundStore(data_dir), results, instance


def test_two_rounds_materialize_every_asset(two_rounds):
    store, results, _ = two_rounds
    assert all(r.success for r in results)
    for key in ("round_000", "round_001"):
        for table in (
            "prompts",
            "generations",
            "critiques",
            "filtered",
            "checkpoints",
            "eval_scores",
        ):
            assert store.has(key, table), (key, table)
        assert store.has_checkpoint(key)


def test_round_metadata_records_policy_and_rates(two_rounds):
    store, results, _ = two_rounds
    generations = results[1].asset_materializations_for_node(node("generations"))[0].metadata
    assert generations["policy_checkpoint"].value == store.checkpoint_ref("round_000")
    assert generations["parent_round"].value == "round_000"
    assert generations["dagster/row_count"].value == 16  # 8 train prompts x 2 samples
    filtered = results[0].asset_materializations_for_node(node("filtered"))[0].metadata
    assert filtered["dagster/row_count"].value == 4  # sample 0 of every other prompt
    scores = next(
        m.metadata
        for m in results[1].asset_materializations_for_node(node("eval_scores"))
        if m.asset_key == dg.AssetKey(["t", "eval_scores"])
    )
    assert scores["accuracy_after"].value == pytest.approx(0.5)  # the scripted engine's rate
    assert scores["accuracy_before"].value == pytest.approx(0.5)  # read from round_000


def test_round_one_trains_on_top_of_round_zero(two_rounds):
    store, _, _ = two_rounds
    manifest = store.read("round_001", "checkpoints").row(0, named=True)
    assert manifest["trained_from"] == "../round_000"
    assert manifest["optimizer_steps"] == manifest["planned_steps"] == 1


def test_catalog_answers_lineage_of_a_filtered_row(two_rounds):
    store, _, _ = two_rounds
    with duckdb.connect(str(store.catalog_path), read_only=True) as con:
        row = con.execute(
            """
            SELECT f.generation_id, g.policy, g.temperature, p.prompt, c.path
            FROM filtered f
            JOIN generations g USING (generation_id)
            JOIN prompts p ON p.prompt_id = f.prompt_id AND p.round = f.round
            JOIN checkpoints c ON c.round = f.round
            WHERE f.round = 'round_001'
            LIMIT 1
            """
        ).fetchone()
    generation_id, policy, temperature, prompt, trained_checkpoint = row
    assert policy.endswith("checkpoints/round_000")
    assert prompt.startswith("What is")
    assert trained_checkpoint.endswith("checkpoints/round_001")


def test_round_without_previous_checkpoint_fails_and_runs_nothing_downstream(tiny_model, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize("round_003", _resources(tmp_path, tiny_model), instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == node("generations")
    assert "round_002 has no checkpoint" in str(failure.step_failure_data.error.to_string())
    assert not RoundStore(tmp_path).has("round_003", "critiques")


def test_empty_filtered_set_is_blocked_before_training(tiny_model, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(
        "round_000", _resources(tmp_path, tiny_model, wrong_always=True), instance
    )
    assert not result.success
    evaluation = next(
        e for e in result.get_asset_check_evaluations() if e.check_name == "check_min_rows_filtered"
    )
    assert not evaluation.passed
    assert "has 0 rows" in evaluation.description and "Fix:" in evaluation.description
    store = RoundStore(tmp_path)
    assert store.has("round_000", "filtered")  # kept for inspection
    assert not store.has_checkpoint("round_000")  # never trained


def test_critiques_asset_called_directly(two_rounds):
    store, _, _ = two_rounds
    _, loop = loop_definitions({"storage": StorageResource(data_dir=str(store.data_dir))})
    context = dg.build_asset_context(
        partition_key="round_000",
        resources={loop.resource_key(g): r for g, r in loop.spec.resources.items()},
    )
    # star's verifier needs no model: the generator is never loaded.
    (result,) = list(critiques_asset(loop)(context))  # no refinements: one result
    assert result.asset_key == dg.AssetKey(["t", "critiques"])
    assert result.metadata["dagster/row_count"] == 16
    assert result.metadata["accept_rate"] == pytest.approx(0.25)


def test_every_gate_passes_on_a_clean_round(two_rounds):
    _, results, _ = two_rounds
    for result in results:
        evaluations = result.get_asset_check_evaluations()
        assert len(evaluations) == len(GATES) - len(RL_ONLY_CHECKS)
        failed = [(e.check_name, e.description) for e in evaluations if not e.passed]
        assert failed == []


def test_eval_scores_carry_monitors(two_rounds):
    # The history plot and the promoted policy are assets of their own now
    # (assets/policy.py, tests/test_policy_assets.py).
    store, _, _ = two_rounds
    row = store.read("round_001", "eval_scores").row(0, named=True)
    assert row["selection_precision"] == 1.0  # the verifier keeps only correct samples
    assert row["train_solved_fraction"] == pytest.approx(0.5)


class ContaminatedTask(TaskResource):
    """Planted defect: train prompt 0 is an eval prompt with other case and spacing."""

    def problems(self):
        import polars as pl

        from selfimprove_dagster.ids import prompt_id

        rows = [
            ("what is 23 + 45 ?", "68", "train"),  # contaminated copy of the eval prompt
            ("What is 11 + 12?", "23", "train"),
            ("What is 30 + 31?", "61", "train"),
            ("What is 23 + 45?", "68", "eval"),
            ("What is 50 + 12?", "62", "eval"),
        ]
        return pl.DataFrame(
            [
                {"prompt_id": prompt_id(p), "prompt": p, "answer": a, "split": s, "task": "t"}
                for p, a, s in rows
            ]
        )


def test_contaminated_prompt_blocks_training(tiny_model, tmp_path):
    resources = _resources(tmp_path, tiny_model, task=ContaminatedTask())
    result = _materialize("round_000", resources, dg.DagsterInstance.ephemeral())
    assert not result.success
    evaluation = next(
        e
        for e in result.get_asset_check_evaluations()
        if e.check_name == "check_no_contamination_prompts"
    )
    assert not evaluation.passed
    offending = evaluation.metadata["contaminated_prompts"].value
    assert offending[0]["prompt"] == "what is 23 + 45 ?"
    from selfimprove_dagster.cli import run_failure_message

    message = run_failure_message(result)  # what `selfimprove run` prints
    assert message.startswith("gate check_no_contamination_prompts failed:")
    assert not RoundStore(tmp_path).has_checkpoint("round_000")


def test_duplicated_generation_blocks_training(tiny_model, tmp_path, monkeypatch):
    from selfimprove_dagster.methods import star

    real_filter = star.filter_accepted

    def filter_with_duplicate(generations, critiques, max_per_prompt, refinements=None):
        kept = real_filter(generations, critiques, max_per_prompt, refinements)
        return kept.vstack(kept.head(1))  # planted defect: one generation twice

    monkeypatch.setattr(star, "filter_accepted", filter_with_duplicate)
    result = _materialize(
        "round_000", _resources(tmp_path, tiny_model), dg.DagsterInstance.ephemeral()
    )
    assert not result.success
    failed = {e.check_name for e in result.get_asset_check_evaluations() if not e.passed}
    assert "check_unique_generation_id_filtered" in failed
    assert not RoundStore(tmp_path).has_checkpoint("round_000")


def test_lineage_of_a_checkpoint_and_of_a_generation(two_rounds):
    from selfimprove_dagster.store import lineage

    store, _, _ = two_rounds
    found = lineage.checkpoint_lineage(store, "round_000")
    assert found["checkpoint"]["round"] == "round_000"
    trained_on = found["trained_on"]
    assert len(trained_on) == 4 and {r["round"] for r in trained_on} == {"round_000"}
    first = lineage.generation_lineage(store, trained_on[0]["generation_id"])
    assert first["critiques"][0]["verdict"] == "accept"
    assert first["trained_into"]["checkpoint"].endswith("checkpoints/round_000")
    assert first["descendant_rounds"] == ["round_001"]  # generated by round_000's checkpoint


def test_lineage_of_unknown_ids_names_the_fix(two_rounds):
    from selfimprove_dagster.errors import SelfImproveError
    from selfimprove_dagster.store import lineage

    store, _, _ = two_rounds
    with pytest.raises(SelfImproveError, match="No generation `nope`"):
        lineage.generation_lineage(store, "nope")
    with pytest.raises(SelfImproveError, match="round_009 has no checkpoint"):
        lineage.checkpoint_lineage(store, "round_009")


def test_auto_temperature_measures_the_grid_and_sets_the_next_round(tiny_model, tmp_path):
    from selfimprove_dagster.evolution import round_temperature

    resources = _resources(tmp_path, tiny_model)
    resources["evolution"] = EvolutionResource(
        auto_temperature=True, temperature_grid=[0.6, 1.0], tuning_prompts=4
    )
    result = _materialize("round_000", resources, dg.DagsterInstance.ephemeral())
    assert result.success
    store = RoundStore(tmp_path)
    row = store.read("round_000", "eval_scores").row(0, named=True)
    # The scripted engine ignores temperature: a tie, broken towards the lower one.
    assert row["next_temperature"] == 0.6
    assert "T=0.6: " in row["next_temperature_reason"]
    assert "T=1: " in row["next_temperature_reason"]
    assert round_temperature(store, "round_001", 0.8, auto=True) == (
        0.6,
        row["next_temperature_reason"],
    )


def test_promoted_policy_record_points_at_the_best_round(two_rounds):
    store, _, instance = two_rounds
    defs, loop = loop_definitions({"storage": StorageResource(data_dir=str(store.data_dir))})
    assert defs.resolve_job_def(loop.policy_job_name).execute_in_process(instance=instance).success
    with duckdb.connect(str(store.catalog_path), read_only=True) as con:
        promoted = con.execute("SELECT round, checkpoint FROM promoted_policy").fetchall()
    # Both rounds score 50% (the scripted engine): a tie goes to the earliest round.
    assert promoted == [("round_000", str(store.checkpoint_dir("round_000")))]


def test_every_table_is_an_asset_with_its_schema_view_location_and_data_version(two_rounds):
    store, results, _ = two_rounds
    events = {
        m.asset_key.path[-1]: m
        for m in (e.materialization for e in results[1].get_asset_materialization_events())
    }
    for table in ("prompts", "prompt_mix", "generations", "critiques", "filtered"):
        assert table in events, table
    for table in ("checkpoints", "eval_scores", "eval_details"):
        metadata = events[table].metadata
        assert metadata["dagster/table_name"].value == table  # its DuckDB view
        assert metadata["dagster/uri"].value == store.table_uri("round_001", table)
        assert metadata["dagster/row_count"].value == store.read("round_001", table).height
        columns = {c.name for c in metadata["dagster/column_schema"].schema.columns}
        assert "round" in columns
        assert events[table].tags["dagster/data_version"] == store.data_version("round_001", table)
    checkpoint = events["checkpoint"]
    manifest_row = store.read("round_001", "checkpoints").row(0, named=True)
    assert checkpoint.tags["dagster/data_version"] == manifest_row["adapter_sha256"]
    assert "refinements" not in events and "rollouts" not in events  # star writes neither
