"""The `prompts` asset through Dagster with each kind of source, and its blocking
checks. A scripted policy (test-only fake) writes the Self-Instruct prompts."""

from __future__ import annotations

import json

import dagster as dg
import duckdb
import polars as pl
import pytest

from selfimprove_dagster.resources import (
    EvolutionResource,
    GatesResource,
    GeneratorResource,
    MethodResource,
    StorageResource,
    TaskResource,
)
from selfimprove_dagster.store.storage import RoundStore
from tests.conftest import SHARED_DATA, materialize_steps, node
from tests.test_curriculum import BandSkillEngine
from tests.test_synthesis import ScriptedSynthEngine

SEED_FILE = str(SHARED_DATA / "self_instruct" / "seed_tasks.jsonl")

# What the scripted policy writes when asked for new tasks (one per request, in order).
SCRIPTED_TASKS = [
    "How many legs do 4 dogs have in total?",  # kept
    "Draw a map of 3 cities.",  # blacklisted ("map" comes before "draw" in the list)
    "How many legs do 4 dogs have in all?",  # near-duplicate of the first
    "Is there anything I can eat for a breakfast that doesn't include eggs, yet includes "
    "protein, and has roughly 700-1000 calories?",  # a seed task, copied
    "How many days are in 3 weeks?",  # kept
    "ok",  # too short
    "How many wheels are on 6 tricycles?",  # kept
    "What is the number of hours in 2 days?",  # kept
] + [f"Task {i}: filler question number {i} about nothing?" for i in range(40)]


class ScriptedPolicy(GeneratorResource):
    def load(self, model_ref, models_dir):
        return ScriptedSynthEngine(list(SCRIPTED_TASKS))


class BandSkillPolicy(GeneratorResource):
    def load(self, model_ref, models_dir):
        return BandSkillEngine()


def _materialize(data_dir, task: TaskResource, key="round_000", generator=None, method=None):
    resources = {
        "storage": StorageResource(data_dir=str(data_dir)),
        "task": task,
        "generator": generator or ScriptedPolicy(base_model="scripted"),
        "evolution": EvolutionResource(),
        "method": method or MethodResource(),
        "gates": GatesResource(),
    }
    return materialize_steps(resources, key, dg.DagsterInstance.ephemeral(), ["prompts"])


def _checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _metadata(result) -> dict:
    materialization = next(
        m
        for m in result.asset_materializations_for_node(node("prompts"))
        if m.asset_key == dg.AssetKey(["t", "prompts"])
    )
    return {k: v.value for k, v in materialization.metadata.items()}


def test_default_source_is_the_fixed_task(tmp_path):
    result = _materialize(tmp_path, TaskResource(n_train=8, n_eval=6))
    assert result.success
    assert len(_checks(result)) == 5 and all(_checks(result).values())
    table = RoundStore(tmp_path).read("round_000", "prompts")
    assert table["source"].unique().to_list() == ["task"]
    assert _metadata(result)["sources"] == "task=1"


def test_curriculum_and_self_instruct_mixed_by_weight(tmp_path):
    task = TaskResource(
        n_train=20,
        n_eval=10,
        sources=["curriculum=0.8", "self_instruct=0.2"],
        curriculum_bands=[1, 2, 3],
        curriculum_eval_bands=[3],
        curriculum_measure="previous_round",  # the scripted policy only writes tasks
        seed_tasks_path=SEED_FILE,
        synth_passes=2,
        synth_oversample=2.0,
    )
    result = _materialize(tmp_path, task)
    assert result.success
    assert all(_checks(result).values()), _checks(result)
    store = RoundStore(tmp_path)
    table = store.read("round_000", "prompts")
    train = table.filter(pl.col("split") == "train")
    assert dict(train.group_by("source").len().iter_rows()) == {
        "curriculum": 16,
        "self_instruct": 4,
    }
    synthesized = train.filter(pl.col("source") == "self_instruct")
    assert synthesized["prompt"].to_list()[:2] == [
        "How many legs do 4 dogs have in total? Answer with just the number.",
        "How many days are in 3 weeks? Answer with just the number.",
    ]
    assert all(len(s) == 4 for s in synthesized["seed_ids"])  # real seed ids
    assert all(s.startswith("seed_task_") for ids in synthesized["seed_ids"] for s in ids)

    candidates = store.read("round_000", "prompt_candidates")
    reasons = dict(candidates.group_by("drop_reason").len().iter_rows())
    assert reasons[None] == 4
    assert reasons["blacklisted"] == 1 and reasons["too_short"] == 1
    assert reasons["near_duplicate"] == 2  # the dog rephrasing and the copied seed task
    metadata = _metadata(result)
    assert metadata["chosen_band"] == 1
    assert metadata["synthesized_kept"] == 4 and metadata["dropped_near_duplicate"] == 2
    assert metadata["dedup_rate"] == pytest.approx(2 / 6, abs=1e-4)  # 6 reached the filter
    assert json.loads(metadata["solve_rates"]) == {}  # round 0: nothing measured yet

    # Provenance and drop reasons are queryable in the catalog.
    with duckdb.connect(str(store.catalog_path), read_only=True) as con:
        dropped = con.execute(
            "SELECT drop_reason, count(*) FROM prompt_candidates WHERE NOT kept "
            "GROUP BY drop_reason ORDER BY drop_reason"
        ).fetchall()
        assert ("near_duplicate", 2) in dropped
        bands = con.execute(
            "SELECT chosen_band, band_reason FROM prompt_mix WHERE chosen_band IS NOT NULL"
        ).fetchall()
        assert bands[0][0] == 1 and "start at band 1" in bands[0][1]


def test_curriculum_band_follows_the_policys_measured_solve_rate(tmp_path):
    task = TaskResource(
        n_train=24,
        n_eval=8,
        sources=["curriculum"],
        curriculum_bands=[1, 2, 3],
        curriculum_eval_bands=[3],
        curriculum_measure_per_band=3,
        curriculum_measure_samples=2,
    )
    result = _materialize(tmp_path, task, generator=BandSkillPolicy(base_model="band-skill"))
    assert result.success and all(_checks(result).values()), _checks(result)
    metadata = _metadata(result)
    assert metadata["chosen_band"] == 2 and metadata["rates_measured_on"] == "policy band-skill"
    assert json.loads(metadata["solve_rates"]) == {"1": 1.0, "2": 0.5, "3": 0.0}
    store = RoundStore(tmp_path)
    with duckdb.connect(str(store.catalog_path), read_only=True) as con:
        per_band = con.execute(
            "SELECT band, avg(correct::INT), count(*) FROM curriculum_measure "
            "GROUP BY band ORDER BY band"
        ).fetchall()
    assert per_band == [(1, 1.0, 6), (2, 0.5, 6), (3, 0.0, 6)]


def test_contamination_check_blocks_a_train_prompt_copying_an_eval_prompt(tmp_path):
    dataset = tmp_path / "problems.jsonl"
    rows = [
        {"prompt": "What is 23 + 45?", "answer": 68, "split": "eval"},
        {"prompt": "What is 11 + 12?", "answer": 23, "split": "eval"},
        {"prompt": "Q: What is 23 + 45?", "answer": 68, "split": "train"},  # near copy
        {"prompt": "What is 30 + 31?", "answer": 61, "split": "train"},
    ]
    dataset.write_text("\n".join(json.dumps(r) for r in rows))
    result = _materialize(tmp_path, TaskResource(dataset_path=str(dataset), n_train=2, n_eval=2))
    checks = _checks(result)
    assert checks["check_no_contamination_prompts"] is False
    assert checks["check_unique_prompts"] and checks["check_length_prompts"]


def test_contaminated_train_rows_are_dropped_and_recorded(tmp_path):
    dataset = tmp_path / "problems.jsonl"
    rows = [
        {"prompt": "What is 23 + 45?", "answer": 68, "split": "eval"},
        {"prompt": "What is 11 + 12?", "answer": 23, "split": "eval"},
        {"prompt": "Q: What is 23 + 45?", "answer": 68, "split": "train"},  # near copy
        {"prompt": "What is 30 + 31?", "answer": 61, "split": "train"},
    ]
    dataset.write_text("\n".join(json.dumps(r) for r in rows))
    task = TaskResource(dataset_path=str(dataset), n_train=1, n_eval=2, drop_contaminated=True)
    result = _materialize(tmp_path, task)
    assert result.success and all(_checks(result).values())  # the gate passes
    metadata = _metadata(result)
    assert metadata["contaminated_dropped"] == 1
    assert "Q: What is 23 + 45?" in metadata["contaminated_preview"]
    # Nothing hidden: the dropped row is a row of `prompt_candidates`, with its match.
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as con:
        dropped = con.execute(
            "SELECT source, prompt, eval_prompt, answer, kept FROM prompt_candidates "
            "WHERE drop_reason = 'contaminated'"
        ).fetchall()
    assert dropped == [("dataset", "Q: What is 23 + 45?", "What is 23 + 45?", "68", False)]


def _code_dataset(path) -> str:
    rows = [
        {
            "text": f"Write a function add{i}(a, b) that returns a + b.",
            "test_list": [f"assert add{i}(1, 2) == 3"],
            "test_setup_code": "",
            "code": f"def add{i}(a, b):\n    return a + b",
            "split": "train" if i < 2 else "test",
        }
        for i in range(4)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_self_consistency_on_code_tasks_fails_before_anything_is_sampled(tmp_path):
    task = TaskResource(dataset_path=_code_dataset(tmp_path / "mbpp.jsonl"), n_train=2, n_eval=2)
    result = _materialize(tmp_path, task, method=MethodResource(method="self_consistency"))
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.cause.message
    assert "self_consistency cannot vote" in message and "SELFIMPROVE_METHOD=star" in message
    assert not RoundStore(tmp_path).has("round_000", "prompts")  # nothing published
    # star judges the same rows with their tests: the round starts.
    assert _materialize(tmp_path, task).success
