"""Two rounds of every method through Dagster: a scripted engine (test-only fake) plays
the policy, the judge and the refiner; training is real LoRA (SFT or DPO) on a tiny
model, and every gate runs."""

from __future__ import annotations

import re

import dagster as dg
import polars as pl
import pytest

from selfimprove_dagster.assets.checks import GATES, RL_ONLY_CHECKS
from selfimprove_dagster.engines.base import Completion
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
from tests.conftest import ScriptedEngine, materialize_round, node

_QUESTION = re.compile(r"What is (\d+) \+ (\d+)")


class MethodScriptedEngine(ScriptedEngine):
    """Answers like `ScriptedEngine` (right for sample 0 of every other prompt); as a
    judge it gives 5 points to a right answer and 1 to a wrong one; as a critic it
    always objects; as a refiner it flips: a wrong answer becomes right (repaired),
    a right one wrong (broken)."""

    def generate(self, prompts, n, sampling, log=None, response_prefix=""):
        if not prompts or _QUESTION.match(prompts[0]) and "Feedback:" not in prompts[0]:
            return super().generate(prompts, n, sampling, log)
        return [
            Completion(i, s, self._reply(prompt), 30, 4, "stop")
            for i, prompt in enumerate(prompts)
            for s in range(n)
        ]

    @staticmethod
    def _reply(prompt: str) -> str:
        a, b = map(int, _QUESTION.search(prompt).groups())
        answer = re.search(
            r"(?:Response|Proposed answer|previous answer was): [^=]*= (\d+)", prompt
        )
        right = answer is not None and int(answer.group(1)) == a + b
        if prompt.startswith("Rate the response"):
            return " 5" if right else " 1"
        if prompt.startswith("Here is a question"):
            return "The proposed answer is wrong."
        return f"{a} + {b} = {a + b + 2 if right else a + b}"


class MethodGenerator(GeneratorResource):
    def load(self, model_ref, models_dir):
        return MethodScriptedEngine(model_ref)


def _run_two_rounds(tiny_model, models_dir, data_dir, **method):
    (data_dir / "models").symlink_to(models_dir)
    resources = {
        "storage": StorageResource(data_dir=str(data_dir)),
        "task": TaskResource(n_train=8, n_eval=6, eval_samples_per_prompt=2, pass_at_k_prompts=4),
        "generator": MethodGenerator(base_model=tiny_model, samples_per_prompt=2),
        "trainer": TrainerResource(epochs=1, batch_size=4, lora_r=4, lora_alpha=8),
        "gates": GatesResource(),
        "evolution": EvolutionResource(),
        "method": MethodResource(**method),
    }
    instance = dg.DagsterInstance.ephemeral()
    results = []
    for key in ("round_000", "round_001"):
        results.append(materialize_round(resources, key, instance))
    return RoundStore(data_dir), results


def _assert_clean(results):
    for result in results:
        assert result.success
        failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
        assert failed == []
        assert len(result.get_asset_check_evaluations()) == len(GATES) - len(RL_ONLY_CHECKS)


@pytest.fixture(scope="module")
def self_consistency_rounds(tiny_model, models_dir, tmp_path_factory):
    return _run_two_rounds(
        tiny_model, models_dir, tmp_path_factory.mktemp("sc"), method="self_consistency"
    )


@pytest.fixture(scope="module")
def self_judge_rounds(tiny_model, models_dir, tmp_path_factory):
    return _run_two_rounds(
        tiny_model, models_dir, tmp_path_factory.mktemp("sj"), method="self_judge"
    )


@pytest.fixture(scope="module")
def self_refine_rounds(tiny_model, models_dir, tmp_path_factory):
    return _run_two_rounds(
        tiny_model, models_dir, tmp_path_factory.mktemp("sr"), method="self_refine", refine_probe=2
    )


def test_self_consistency_trains_on_pseudo_labels_only(self_consistency_rounds):
    store, results = self_consistency_rounds
    _assert_clean(results)
    critiques = store.read("round_000", "critiques")
    assert critiques["critic"].unique().to_list() == ["majority_vote"]
    # Even prompts: one right and one wrong sample, a tie (no label). Odd prompts: the
    # same wrong answer twice, so the majority label is wrong and still trained on.
    kept = store.read("round_000", "filtered")
    assert kept.height == 4
    assert not critiques.filter(pl.col("verdict") == "accept")["correct"].any()
    scores = store.read("round_000", "eval_scores").row(0, named=True)
    assert scores["method"] == "self_consistency"
    assert scores["pseudo_labeled_prompts"] == 4
    assert scores["pseudo_label_precision"] == 0.0


def test_self_judge_trains_dpo_on_pairs_and_the_checkpoint_generates(self_judge_rounds):
    store, results = self_judge_rounds
    _assert_clean(results)  # includes the training and loads-and-generates gates
    critiques = store.read("round_000", "critiques")
    assert critiques["critic"].unique().to_list() == ["policy_judge"]
    assert critiques["critique"][0].startswith("Score:")
    pairs = store.read("round_000", "filtered")
    # Even prompts have a right (5 points) and a wrong (1 point) answer: one pair each.
    assert pairs.height == 4
    assert (pairs["chosen_score"] - pairs["rejected_score"]).min() == pytest.approx(0.8)
    manifest = store.read("round_001", "checkpoints").row(0, named=True)
    assert manifest["optimizer_steps"] == manifest["planned_steps"] == 1
    scores = store.read("round_000", "eval_scores").row(0, named=True)
    assert scores["method"] == "self_judge"
    assert scores["judge_accuracy"] == 1.0 and scores["pair_accuracy"] == 1.0
    assert scores["pairs"] == 4 and scores["judge_unparseable_rate"] == 0.0
    metadata = results[0].asset_materializations_for_node(node("checkpoint"))[0].metadata
    assert metadata["objective"].value == "dpo"


def test_self_refine_adds_repaired_answers_and_counts_breakage(self_refine_rounds):
    store, results = self_refine_rounds
    _assert_clean(results)
    critiques = store.read("round_000", "critiques")
    assert set(critiques["critic"]) == {"verifier", "refiner"}
    refinements = store.read("round_000", "refinements")
    # 4 unsolved (odd) prompts refined, 2 solved ones probed.
    assert refinements.height == 6 and int(refinements["probe"].sum()) == 2
    assert set(refinements["feedback_source"]) == {"critic", "neutral"}
    kept = store.read("round_000", "filtered")
    assert kept.group_by("source").len().sort("source").rows() == [("generated", 4), ("refined", 4)]
    scores = store.read("round_000", "eval_scores").row(0, named=True)
    assert (scores["refined"], scores["repaired"], scores["probed"], scores["broken"]) == (
        4,
        4,
        2,
        2,
    )
    with_feedback = refinements.join(
        critiques.select("generation_id", "critique"), on="generation_id"
    )
    assert (with_feedback["feedback"] == with_feedback["critique"]).all()


def test_self_refine_with_self_feedback_stores_the_policy_critique(
    tiny_model, models_dir, tmp_path
):
    store, results = _run_two_rounds(
        tiny_model, models_dir, tmp_path, method="self_refine", refine_feedback="self"
    )
    _assert_clean(results)
    refinements = store.read("round_001", "refinements")
    assert set(refinements["feedback_source"]) == {"self"}
    assert set(refinements["feedback"]) == {"The proposed answer is wrong."}


def test_an_unknown_method_fails_before_anything_is_sampled(tiny_model, models_dir, tmp_path):
    store, results = _run_two_rounds(
        tiny_model, models_dir, tmp_path, method="self_judge+self_refine"
    )
    assert not results[0].success
    failure = next(e for e in results[0].all_events if e.is_step_failure)
    assert failure.step_key == node("prompts")
    assert "does not compose with self_judge" in str(failure.step_failure_data.error.to_string())
    assert not store.has("round_000", "prompts") and not store.has("round_000", "generations")


def test_lineage_follows_a_refined_answer_to_the_sample_it_rewrote(self_refine_rounds):
    from selfimprove_dagster.store import lineage

    store, _ = self_refine_rounds
    trained_on = lineage.checkpoint_lineage(store, "round_000")["trained_on"]
    refined = [r for r in trained_on if r["source"] == "refined"]
    assert len(trained_on) == 8 and len(refined) == 4  # none dropped by the join
    assert all(r["refined_from"] and r["policy"] for r in refined)
    found = lineage.generation_lineage(store, refined[0]["generation_id"])
    assert found["refinement"]["parent_generation_id"] == refined[0]["refined_from"]
    assert found["generation"]["generation_id"] == refined[0]["refined_from"]
    assert found["trained_into"]["checkpoint"].endswith("round_000")
