"""Great Expectations suites of a round's tables: each passes on the tables the STaR
steps produce, and fails, naming the expectation and offending values, on a copy with
planted defects."""

from __future__ import annotations

import polars as pl
import pytest

from selfimprove_dagster.engines.base import Completion, Sampling
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.ids import prompt_id
from selfimprove_dagster.methods import grpo, star
from selfimprove_dagster.quality.expectations import SUITES, validate_table
from selfimprove_dagster.training.params import RLParams

MAX_NEW_TOKENS = 16


def _prompts() -> pl.DataFrame:
    texts = ["What is 10 + 20?", "What is 30 + 40?", "What is 11 + 11?"]
    return pl.DataFrame(
        {
            "round": ["round_000"] * 3,
            "prompt_id": [prompt_id(t) for t in texts],
            "prompt": texts,
            "answer": ["30", "70", "22"],
            "split": ["train", "train", "eval"],
            "task": ["t"] * 3,
        }
    )


def _generations() -> pl.DataFrame:
    samples = [["30", "10 + 20 = 30", "31"], ["70", "I am not sure", "7"]]
    completions = [
        # The second sample of each prompt hit the token budget (+1 for the end token).
        Completion(i, s, text, 5, MAX_NEW_TOKENS + 1 if s == 1 else 3, "length" if s else "stop")
        for i, texts in enumerate(samples)
        for s, text in enumerate(texts)
    ]
    sampling = Sampling(max_new_tokens=MAX_NEW_TOKENS)
    train = star.train_prompts(_prompts())
    return star.generations_frame("round_000", train, completions, "base", sampling)


def _critiques() -> pl.DataFrame:
    return star.critique_generations(_generations(), _prompts())


def _filtered() -> pl.DataFrame:
    return star.filter_accepted(_generations(), _critiques(), max_per_prompt=2)


def _eval_details() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "prompt_id": ["p1", "p2", "p3"],
            "greedy_correct": [True, False, True],
            "pass_at_k": [1.0, 0.25, None],  # p3 was not sampled for pass@k
        }
    )


def _rollouts() -> pl.DataFrame:
    # What TRL logged for two optimizer steps of one prompt (2 rollouts each).
    logged = pl.DataFrame(
        {
            "step": [1, 1, 2, 2],
            "prompt_id": ["p1"] * 4,
            "prompt": ["What is 10 + 20?"] * 4,
            "completion": ["30", "31", "30", "30"],
            "completion_tokens": [2, 2, 2, 2],
            "correct": [True, False, True, True],
            "extracted_answer": ["30", "31", "30", "30"],
            "reference_answer": ["30"] * 4,
            "reason": ["correct", "wrong_answer", "correct", "correct"],
            "verifier_reward": [1.0, 0.0, 1.0, 1.0],
            "advantage": [0.5, -0.5, 0.0, 0.0],
        }
    )
    return grpo.rollout_rows(logged, "round_000", "base", RLParams(), ["verifier_reward"])


CLEAN = {
    "prompts": _prompts,
    "generations": _generations,
    "critiques": _critiques,
    "filtered": _filtered,
    "eval_details": _eval_details,
    "rollouts": _rollouts,
}


def _failed(result) -> dict[tuple[str, str | None], dict]:
    return {(f["expectation"], f["column"]): f for f in result.failures}


def test_every_table_has_a_suite_and_a_clean_fixture():
    assert set(SUITES) == set(CLEAN)


@pytest.mark.parametrize("table", sorted(CLEAN))
def test_clean_tables_pass(table):
    result = validate_table(table, CLEAN[table](), max_new_tokens=MAX_NEW_TOKENS)
    assert result.passed, result.message
    assert result.evaluated == len(SUITES[table]())
    assert result.failures == []


def test_prompts_with_defects_fail():
    frame = _prompts().with_columns(
        # Planted: an unknown split, a null id, an empty prompt.
        split=pl.Series(["train", "test", "eval"]),
        prompt_id=pl.Series(["a", None, "c"]),
        prompt=pl.Series(["What is 10 + 20?", "What is 30 + 40?", ""]),
    )
    failed = _failed(validate_table("prompts", frame))
    assert failed["expect_column_values_to_be_in_set", "split"]["examples"] == ["test"]
    assert failed["expect_column_values_to_not_be_null", "prompt_id"]["observed"] == "1 of 3 rows"
    assert failed["expect_column_value_lengths_to_be_between", "prompt"]["examples"] == [""]
    assert len(failed) == 3


def test_prompt_longer_than_the_bound_fails():
    # Planted: a 4001-character prompt.
    frame = _prompts().with_columns(prompt=pl.Series(["x" * 4001, "a", "b"]))
    failed = _failed(validate_table("prompts", frame))
    assert ("expect_column_value_lengths_to_be_between", "prompt") in failed


def test_generations_with_defects_fail():
    clean = _generations()
    frame = clean.with_columns(
        # Planted: row 2 reuses row 0's id; row 3 overran the budget by 2 tokens;
        # row 4 has an unknown finish reason; row 5 a negative temperature.
        generation_id=pl.Series(
            [*clean["generation_id"][:2], clean["generation_id"][0], *clean["generation_id"][3:]]
        ),
        completion_tokens=pl.Series([3, 17, 3, MAX_NEW_TOKENS + 2, 17, 3]),
        finish_reason=pl.Series(["stop", "length", "stop", "length", "timeout", "stop"]),
        temperature=pl.Series([0.8, 0.8, 0.8, 0.8, 0.8, -0.1]),
    )
    failed = _failed(validate_table("generations", frame, max_new_tokens=MAX_NEW_TOKENS))
    assert failed["expect_column_values_to_be_unique", "generation_id"]["examples"] == [
        clean["generation_id"][0]
    ]
    assert failed["expect_column_values_to_be_between", "completion_tokens"]["examples"] == [18]
    assert failed["expect_column_values_to_be_in_set", "finish_reason"]["examples"] == ["timeout"]
    assert failed["expect_column_values_to_be_between", "temperature"]["examples"] == [-0.1]
    assert len(failed) == 4


def test_generation_token_bound_defaults_to_the_frames_budget():
    # Planted: 18 tokens against the frame's own max_new_tokens=16 (+1 tolerated).
    frame = _generations().with_columns(completion_tokens=pl.Series([3, 18, 3, 3, 3, 3]))
    result = validate_table("generations", frame)
    assert not result.passed
    assert _failed(result)["expect_column_values_to_be_between", "completion_tokens"]


def test_null_completion_reports_the_row():
    frame = _generations().with_columns(
        # Planted: sample 1 of the first prompt lost its text.
        completion=pl.Series(["30", None, "31", "70", "I am not sure", "7"])
    )
    failure = _failed(validate_table("generations", frame))[
        "expect_column_values_to_not_be_null", "completion"
    ]
    (row,) = failure["examples"]
    assert row["generation_id"] == frame["generation_id"][1]
    assert row["sample_index"] == 1


def test_critiques_with_defects_fail():
    clean = _critiques()
    frame = clean.with_columns(
        # Planted: an unknown verdict, a score above 1, a missing critic name.
        verdict=pl.Series(["accept", "maybe", *clean["verdict"][2:]]),
        score=pl.Series([1.0, 1.5, *clean["score"][2:]]),
        critic=pl.Series([None, *clean["critic"][1:]]),
    )
    failed = _failed(validate_table("critiques", frame))
    assert failed["expect_column_values_to_be_in_set", "verdict"]["examples"] == ["maybe"]
    assert failed["expect_column_values_to_be_between", "score"]["examples"] == [1.5]
    assert ("expect_column_values_to_not_be_null", "critic") in failed
    assert len(failed) == 3


def test_duplicated_critique_fails():
    clean = _critiques()
    frame = pl.concat([clean, clean.head(1)])  # Planted: a generation judged twice.
    failed = _failed(validate_table("critiques", frame))
    assert failed["expect_column_values_to_be_unique", "generation_id"]["examples"] == [
        clean["generation_id"][0]
    ]


def test_filtered_with_defects_fail():
    clean = _filtered()
    frame = pl.concat(
        [
            clean,
            # Planted: an empty completion from an unknown source, with a reused id.
            clean.head(1).with_columns(completion=pl.lit(""), source=pl.lit("synthetic")),
        ]
    )
    failed = _failed(validate_table("filtered", frame))
    assert failed["expect_column_value_lengths_to_be_between", "completion"]["examples"] == [""]
    assert failed["expect_column_values_to_be_in_set", "source"]["examples"] == ["synthetic"]
    assert ("expect_column_values_to_be_unique", "generation_id") in failed
    assert len(failed) == 3


def test_eval_details_with_defects_fail():
    frame = pl.DataFrame(
        {
            "prompt_id": ["p1", "p1", "p3"],  # Planted: p1 scored twice.
            "greedy_correct": [True, None, True],  # Planted: a missing verdict.
            "pass_at_k": [1.0, 1.2, None],  # Planted: a probability above 1.
        }
    )
    failed = _failed(validate_table("eval_details", frame))
    assert set(failed) == {
        ("expect_column_values_to_be_unique", "prompt_id"),
        ("expect_column_values_to_not_be_null", "greedy_correct"),
        ("expect_column_values_to_be_between", "pass_at_k"),
    }


def test_rollouts_with_defects_fail():
    frame = _rollouts().with_columns(
        # Planted: the second rollout reuses the first one's id.
        generation_id=pl.Series(["g1", "g1", "g3", "g4"]),
        # Planted: a rollout labelled as an exploration sample.
        phase=pl.Series(["rollout", "explore", "rollout", "rollout"]),
        # Planted: step 0 (optimizer steps count from 1).
        step=pl.Series([0, 1, 2, 2]),
        # Planted: an infinite reward and a NaN one (pandas reads NaN as null).
        reward=pl.Series([float("inf"), 0.0, float("nan"), 1.0]),
    )
    failed = _failed(validate_table("rollouts", frame))
    assert set(failed) == {
        ("expect_column_values_to_be_unique", "generation_id"),
        ("expect_column_values_to_be_in_set", "phase"),
        ("expect_column_values_to_be_between", "step"),
        ("expect_column_values_to_be_between", "reward"),
        ("expect_column_values_to_not_be_null", "reward"),
    }
    assert failed[("expect_column_values_to_be_in_set", "phase")]["examples"] == ["explore"]


def test_rollouts_suite_needs_the_rl_columns():
    # Planted: a generations-shaped frame passed off as rollouts (no phase/step/reward).
    result = validate_table("rollouts", _generations())
    missing = {f["column"] for f in result.failures if f["expectation"] == "expect_column_to_exist"}
    assert {"phase", "step", "reward", "verdict"} <= missing


def test_empty_round_validates_its_schema():
    # An all-wrong round filters to zero rows: typed and empty is valid here (the
    # min-rows gate is what stops it).
    empty = _filtered().head(0)
    assert validate_table("filtered", empty).passed
    # Planted: the empty frame also lost its `source` column.
    result = validate_table("filtered", empty.drop("source"))
    assert not result.passed
    (failure,) = result.failures
    assert failure["expectation"] == "expect_column_to_exist"
    assert failure["column"] == "source"
    assert "source" in result.message


def test_unknown_table_names_the_known_suites():
    with pytest.raises(SelfImproveError, match="eval_details"):
        validate_table("checkpoints", pl.DataFrame())
