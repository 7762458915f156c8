"""Prompt sources: weights, assembly, cross-round lineage, and the prompts gates."""

from __future__ import annotations

import json
from dataclasses import replace

import polars as pl
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.quality import prompt_gates
from selfimprove_dagster.sources import mix as ps
from selfimprove_dagster.sources.curriculum import CurriculumConfig
from selfimprove_dagster.sources.synthesis import SynthesisConfig
from selfimprove_dagster.store.storage import RoundStore
from tests.test_curriculum import BandSkillEngine
from tests.test_synthesis import ScriptedSynthEngine

# --- weights ---------------------------------------------------------------------------


def test_parse_mix_forms():
    assert ps.parse_mix(["curriculum=0.7", "self_instruct=0.3"]) == {
        "curriculum": 0.7,
        "self_instruct": 0.3,
    }
    assert ps.parse_mix("task") == {"task": 1.0}  # a bare name weighs 1
    assert ps.parse_mix("task=0, self_instruct=1") == {"task": 0.0, "self_instruct": 1.0}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["tasks"], "unknown prompt source"),
        (["task=-1"], "weight"),
        (["task=abc"], "weight"),
        (["task=0"], "no train prompts"),
        (["self_instruct"], "no held-out set"),  # synthesized prompts have no ground truth
        ([], "no train prompts"),
    ],
)
def test_parse_mix_rejects(entries, message):
    with pytest.raises(SelfImproveError, match=message):
        ps.parse_mix(entries)


def test_allocate_largest_remainder():
    assert ps.allocate(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert ps.allocate(200, {"curriculum": 0.7, "self_instruct": 0.3}) == {
        "curriculum": 140,
        "self_instruct": 60,
    }
    assert ps.allocate(5, {"task": 0, "self_instruct": 2}) == {"task": 0, "self_instruct": 5}


# --- assembly --------------------------------------------------------------------------


def test_assemble_drops_what_another_source_already_gave():
    eval_part = ps.problem_rows(
        "round_000", [("What is 1 + 2?", "3", "eval")], task="t", source="task", answer_source="g"
    )
    train_part = ps.problem_rows(
        "round_000",
        [
            ("what is 1 + 2", "3", "train"),  # the task's eval prompt, re-cased: dropped
            ("What is 2 + 2?", "4", "train"),
            ("What is 2 + 2 ?", "4", "train"),  # a repeat within one source: kept ...
        ],
        task="t",
        source="curriculum",
        answer_source="g",
    )
    table, dropped = ps.assemble([train_part, eval_part])
    assert dropped == 1
    assert table.select("prompt", "split").rows() == [
        ("What is 1 + 2?", "eval"),
        ("What is 2 + 2?", "train"),
        ("What is 2 + 2 ?", "train"),
    ]
    # ... for the blocking gate to report: the source itself is broken.
    assert not prompt_gates.gate_unique_prompts(table).passed


def _plan(**overrides) -> ps.PromptPlan:
    values = {"weights": {"task": 1.0}, "n_train": 20, "n_eval": 10, "seed": 0}
    return ps.PromptPlan(**{**values, **overrides})


def test_round_prompts_mixes_task_and_curriculum_with_both_held_out_sets(tmp_path):
    plan = _plan(
        weights={"task": 0.5, "curriculum": 0.5},
        curriculum=CurriculumConfig(
            "addition_digits", bands=(1, 2, 3), eval_bands=(3,), measure="previous_round"
        ),
    )
    result = ps.round_prompts(plan, RoundStore(tmp_path), "round_000")
    table = result.prompts
    assert dict(table.group_by("split").len().iter_rows()) == {"train": 20, "eval": 20}
    assert set(
        table.filter(pl.col("source") == "curriculum", pl.col("split") == "eval")["band"]
    ) == {3}
    assert table["answer_verified"].all()
    mix = {r["source"]: r for r in result.mix.iter_rows(named=True)}
    assert mix["curriculum"]["chosen_band"] == 1 and mix["task"]["train_rows"] == 10
    summary = ps.summary(result)
    assert summary["chosen_band"] == 1 and summary["train_prompts_task"] == 10


def test_weight_zero_source_gives_the_held_out_set_only(tmp_path):
    plan = _plan(
        weights={"task": 0.0, "curriculum": 1.0},
        curriculum=CurriculumConfig("addition_digits", measure="previous_round"),
    )
    table = ps.round_prompts(plan, RoundStore(tmp_path), "round_000").prompts
    assert table.filter(pl.col("source") == "task")["split"].unique().to_list() == ["eval"]


# --- where the curriculum's solve rates come from -------------------------------------------


def test_curriculum_measures_the_rounds_own_policy_before_drawing(tmp_path):
    config = CurriculumConfig(
        "addition_digits", bands=(1, 2, 3), eval_bands=(3,), measure_per_band=4
    )
    plan = _plan(weights={"curriculum": 1.0}, n_train=40, curriculum=config)
    engines: list[BandSkillEngine] = []

    def load_policy():
        engines.append(BandSkillEngine())
        return engines[-1]

    result = ps.round_prompts(plan, RoundStore(tmp_path), "round_000", load_policy)
    mix = result.mix.row(0, named=True)
    # Round 0 too: the base model answers 4 problems x 4 samples per band first.
    assert len(engines) == 1 and len(engines[0].prompts_seen) == 12
    assert mix["chosen_band"] == 2 and mix["rates_measured_on"] == "policy band-skill"
    assert json.loads(mix["solve_rates"]) == {"1": 1.0, "2": 0.5, "3": 0.0}
    assert mix["rates_from_round"] is None
    assert "[solve rates of policy band-skill]" in ps.describe(result)[0]
    measured = result.measurements
    assert measured is not None and measured.height == 48
    assert measured["round"].unique().to_list() == ["round_000"]
    assert measured["policy"].unique().to_list() == ["band-skill"]
    # Measured problems are not held out (nor trained on: they are the policy's probe).
    held_out = set(result.prompts.filter(pl.col("split") == "eval")["prompt"])
    assert not set(measured["prompt"]) & held_out


def test_curriculum_policy_measure_needs_the_policy_unless_round_0_has_a_start_band(tmp_path):
    config = CurriculumConfig("addition_digits", bands=(1, 2, 3))
    plan = _plan(weights={"curriculum": 1.0}, curriculum=config)
    with pytest.raises(SelfImproveError, match="no policy was given.*previous_round"):
        ps.round_prompts(plan, RoundStore(tmp_path), "round_000")
    started = _plan(weights={"curriculum": 1.0}, curriculum=replace(config, start_band=2))
    result = ps.round_prompts(started, RoundStore(tmp_path), "round_000")  # nothing loaded
    assert result.mix.row(0, named=True)["chosen_band"] == 2 and result.measurements is None


def test_next_round_band_comes_from_the_previous_rounds_solve_rates(tmp_path):
    store = RoundStore(tmp_path)
    config = CurriculumConfig(
        "addition_digits",
        bands=(1, 2, 3),
        eval_bands=(3,),
        probe_per_band=4,
        measure="previous_round",
    )
    plan = _plan(weights={"curriculum": 1.0}, n_train=40, curriculum=config)
    first = ps.round_prompts(plan, store, "round_000").prompts
    store.write("round_000", "prompts", first)
    # Round 0's policy: band 1 always right, band 2 right half the time, band 3 never.
    train = first.filter(pl.col("split") == "train")
    correct = {1: [True, True], 2: [True, False], 3: [False, False]}
    critiques = pl.DataFrame(
        [
            {"prompt_id": pid, "correct": ok}
            for pid, band in train.select("prompt_id", "band").iter_rows()
            for ok in correct[band]
        ]
    )
    store.write("round_000", "critiques", critiques)
    result = ps.round_prompts(plan, store, "round_001")
    mix = result.mix.row(0, named=True)
    assert mix["chosen_band"] == 2
    assert json.loads(mix["solve_rates"]) == {"1": 1.0, "2": 0.5, "3": 0.0}
    assert mix["rates_from_round"] == "round_000"
    assert mix["rates_measured_on"] == "round_000 generations"
    assert "band 2 solve rate 0.50 is the closest to target 0.50" in mix["band_reason"]
    second = result.prompts
    # Held-out set unchanged, train prompts moved to band 2 (with replay of band 1).
    assert second.filter(pl.col("split") == "eval")["prompt_id"].to_list() == (
        first.filter(pl.col("split") == "eval")["prompt_id"].to_list()
    )
    roles = dict(second.filter(pl.col("split") == "train").group_by("role").len().iter_rows())
    assert roles == {"probe": 8, "replay": 8, "chosen": 24}
    assert set(second.filter(pl.col("role") == "chosen")["band"]) == {2}


# --- self-instruct through the sources, lineage across rounds ------------------------------


def _synthesis_plan(tmp_path, n_train=4) -> ps.PromptPlan:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "\n".join(
            json.dumps(
                {"id": f"seed_{i}", "instruction": text, "instances": [{"input": "", "output": ""}]}
            )
            for i, text in enumerate(["Name three primary colours.", "Convert 3 km to metres."])
        )
    )
    return _plan(
        weights={"task": 0.0, "self_instruct": 1.0},
        n_train=n_train,
        synthesis=SynthesisConfig(
            n=0, seeds_per_prompt=2, synthesized_per_prompt=2, oversample=1.0
        ),
        seed_tasks_path=str(seeds),
    )


TASKS_ROUND_0 = ["How many legs do 4 dogs have in total?", "How many days are in 3 weeks?"]
TASKS_ROUND_1 = ["How many wheels are on 6 tricycles?", "What is the number of hours in 2 days?"]


def test_self_instruct_rows_carry_provenance_and_unverified_answers(tmp_path):
    store = RoundStore(tmp_path)
    plan = _synthesis_plan(tmp_path, n_train=2)
    result = ps.round_prompts(plan, store, "round_000", lambda: ScriptedSynthEngine(TASKS_ROUND_0))
    train = result.prompts.filter(pl.col("split") == "train")
    assert train.height == 2
    assert train["source"].unique().to_list() == ["self_instruct"]
    assert not train["answer_verified"].any()
    assert train["answer_source"].unique().to_list() == ["ensemble_consensus"]
    assert train["answer"].to_list() == ["7", "7"]  # the scripted ensemble's consensus
    assert train["origin_round"].unique().to_list() == ["round_000"]
    assert all(sorted(s) == ["seed_0", "seed_1"] for s in train["seed_ids"])
    assert result.candidates is not None and result.candidates["kept"].all()
    summary = ps.summary(result)
    assert summary["synthesized_kept"] == 2 and summary["dedup_rate"] == 0.0
    assert summary["unverified_train_prompts"] == 2

    # Round 1 reads round 0's kept prompts back from the store as its in-context pool.
    store.write("round_000", ps.CANDIDATES_TABLE, result.candidates)
    pool = ps.synthesized_pool(store, "round_001")
    assert [p.instruction for p in pool] == TASKS_ROUND_0
    assert {p.origin_round for p in pool} == {"round_000"}
    second = ps.round_prompts(plan, store, "round_001", lambda: ScriptedSynthEngine(TASKS_ROUND_1))
    round_0_ids = set(train["prompt_id"])
    for parents in second.prompts.filter(pl.col("split") == "train")["parent_prompt_ids"]:
        assert set(parents) == round_0_ids  # both earlier prompts shown to every request
    assert ps.summary(second)["pool_from_earlier_rounds"] == 2


def test_self_instruct_needs_the_policy(tmp_path):
    with pytest.raises(SelfImproveError, match="needs the round's policy"):
        ps.round_prompts(_synthesis_plan(tmp_path), RoundStore(tmp_path), "round_000")


# --- the prompts gates, on a clean frame and a frame with planted defects -----------------


def _frame(rows):
    return pl.DataFrame(
        rows,
        schema={
            "prompt_id": pl.String,
            "prompt": pl.String,
            "answer": pl.String,
            "answer_verified": pl.Boolean,
        },
        orient="row",
    )


CLEAN = _frame(
    [("a", "What is 2 + 3?", "5", True), ("b", "How many eyes do 6 owls have?", "12", False)]
)
WITH_ISSUES = _frame(
    [
        ("a", "What is 2 + 3?", "5", True),
        ("c", "what is 2 + 3", "5", True),  # same text up to case and punctuation
        ("d", "   ", "1", True),  # empty prompt
        ("e", "What is 9 + 9?", None, True),  # ground-truth row without an answer
        ("f", "x" * 3000, "1", True),  # too long
    ]
)


def test_prompts_gates_pass_on_a_clean_frame():
    assert prompt_gates.gate_unique_prompts(CLEAN).passed
    assert prompt_gates.gate_nonempty_prompts(CLEAN).passed
    assert prompt_gates.gate_prompt_lengths(CLEAN, 8, 2000).passed


def test_prompts_gates_fail_on_planted_defects():
    unique = prompt_gates.gate_unique_prompts(WITH_ISSUES)
    assert (
        not unique.passed
        and unique.observed == 2
        and "What is 2 + 3?" in unique.details["repeated"]
    )
    nonempty = prompt_gates.gate_nonempty_prompts(WITH_ISSUES)
    assert not nonempty.passed and set(nonempty.details["prompt_ids"]) == {"d", "e"}
    lengths = prompt_gates.gate_prompt_lengths(WITH_ISSUES, 8, 2000)
    assert not lengths.passed and lengths.observed == 2  # the empty one and the long one
    assert lengths.details["longest"] == 3000


def test_a_dataset_in_a_source_mix_keeps_its_answer_format_and_verifier():
    # With `sources`, each source's share is loaded through TaskResource.source_problems:
    # a CommonsenseQA share asks for a rationale and keeps its multiple-choice verifier,
    # and the built-in task's share keeps the numeric one.
    from selfimprove_dagster.resources.task import TaskResource
    from tests.conftest import SHARED_DATA

    task = TaskResource(
        dataset_path=str(SHARED_DATA / "commonsenseqa"),
        sources=["dataset=0.5", "task=0.5"],
        answer_format="rationale",
        n_train=6,
        n_eval=4,
    )
    load = task.plan().load_problems
    mc, arithmetic = load("dataset", 3), load("task", 3)
    assert mc.filter(pl.col("split") == "train").height == 3
    assert set(mc["verifier"]) == {"multiple_choice"}
    assert all("step by step" in p for p in mc["prompt"])
    assert all("step by step" in p for p in arithmetic["prompt"])
    assert "Answer with just the number" not in arithmetic["prompt"][0]
