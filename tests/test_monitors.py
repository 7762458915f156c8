"""B-STaR monitors on a hand-built round whose figures are computed by hand below."""

from __future__ import annotations

import polars as pl
import pytest

from selfimprove_dagster.engines.base import Completion, Sampling
from selfimprove_dagster.ids import prompt_id
from selfimprove_dagster.methods import star
from selfimprove_dagster.quality import monitors

PROBLEMS = [
    ("What is 10 + 20?", "30", "train"),
    ("What is 30 + 40?", "70", "train"),
    ("What is 50 + 5?", "55", "train"),
    ("What is 12 + 13?", "25", "train"),
    ("What is 11 + 11?", "22", "eval"),
]
# Four samples per train prompt (in PROBLEMS order).
SAMPLES = [
    ["30", "10 + 20 = 30", "31", "The answer is 30"],  # 3 correct, 3 different texts
    ["70", "71", "72", "70 "],  # 2 correct, the same text once normalized
    ["1", "2", "3", "I don't know"],  # none correct; one has no answer at all
    ["24", "26", "24", "27"],  # none correct
]


def _prompts() -> pl.DataFrame:
    texts, answers, splits = zip(*PROBLEMS, strict=True)
    return pl.DataFrame(
        {
            "prompt_id": [prompt_id(t) for t in texts],
            "prompt": list(texts),
            "answer": list(answers),
            "split": list(splits),
            "task": ["t"] * len(texts),
        }
    )


def _round() -> tuple[pl.DataFrame, pl.DataFrame]:
    completions = [
        Completion(i, s, text, 5, 3, "stop")
        for i, texts in enumerate(SAMPLES)
        for s, text in enumerate(texts)
    ]
    prompts = _prompts()
    generations = star.generations_frame(
        "round_000", star.train_prompts(prompts), completions, "base", Sampling()
    )
    return generations, star.critique_generations(generations, prompts)


def _lenient(generations: pl.DataFrame, critiques: pl.DataFrame) -> pl.DataFrame:
    """A critic that also accepts two wrong answers (the verifier's ground truth stays)."""
    wrong = generations.filter(
        # Planted: "31" to "What is 10 + 20?" and "1" to "What is 50 + 5?" are accepted.
        pl.col("completion").is_in(["31", "1"])
    )["generation_id"]
    return critiques.with_columns(
        verdict=pl.when(pl.col("generation_id").is_in(wrong))
        .then(pl.lit("accept"))
        .otherwise(pl.col("verdict"))
    )


def test_exploration_figures():
    generations, critiques = _round()
    found = monitors.exploration(generations, critiques, k=2)
    # pass@2 per prompt: 1 - C(1,2)/C(4,2) = 1, 1 - C(2,2)/C(4,2) = 5/6, 0, 0.
    assert found["pass_at_k"] == pytest.approx((1 + 5 / 6) / 4)
    # Distinct correct texts: 3, 1 ("70" and "70 " are one), 0, 0.
    assert found["distinct_correct_per_prompt"] == pytest.approx(1.0)
    # Distinct answers / samples: {30, 31}, {70, 71, 72}, {1, 2, 3} (+ no answer), {24, 26, 27}.
    assert found["answer_diversity"] == pytest.approx((2 + 3 + 3 + 3) / 4 / 4)
    assert found["solved_fraction"] == pytest.approx(0.5)


def test_exploration_caps_k_at_the_samples_of_a_prompt():
    generations, critiques = _round()
    # k = 10 > 4 samples: pass@4, i.e. solved or not.
    assert monitors.exploration(generations, critiques, k=10)["pass_at_k"] == pytest.approx(0.5)


def test_exploration_of_an_empty_round_is_undefined():
    generations, critiques = _round()
    found = monitors.exploration(generations.head(0), critiques.head(0), k=2)
    assert set(found.values()) == {None}


def test_exploitation_of_the_verifier_selection_is_precise():
    generations, critiques = _round()
    kept = star.filter_accepted(generations, critiques, max_per_prompt=2)
    found = monitors.exploitation(critiques, kept)
    # Kept: "30", "10 + 20 = 30" and "70": all correct, 3 of the 5 correct samples.
    assert found == pytest.approx(
        {
            "selection_precision": 1.0,
            "selection_recall": 3 / 5,
            "critic_precision": 1.0,
            "critic_recall": 1.0,
        }
    )


def test_exploitation_exposes_a_lenient_critic():
    generations, critiques = _round()
    lenient = _lenient(generations, critiques)
    kept = star.filter_accepted(generations, lenient, max_per_prompt=3)
    found = monitors.exploitation(lenient, kept)
    # Kept: "30", "10 + 20 = 30", "31", "70", "1": 3 of 5 right; the critic accepts 7, 5 right.
    assert found == pytest.approx(
        {
            "selection_precision": 3 / 5,
            "selection_recall": 3 / 5,
            "critic_precision": 5 / 7,
            "critic_recall": 1.0,
        }
    )


def test_exploitation_without_selection_or_truth_is_none():
    generations, critiques = _round()
    found = monitors.exploitation(
        critiques.head(0), star.filter_accepted(generations, critiques, 2)
    )
    assert set(found.values()) == {None}


def test_balance_score_of_the_verifier_selection():
    generations, critiques = _round()
    kept = star.filter_accepted(generations, critiques, max_per_prompt=2)
    # (correct/selected) * min(1, correct/target), target 2, per prompt:
    # 2/2 * 1 = 1; 1/1 * 1/2 = 0.5; nothing selected: 0; nothing selected: 0.
    assert monitors.balance_score(critiques, kept, target=2) == pytest.approx(1.5 / 4)


def test_balance_score_penalizes_wrong_selections():
    generations, critiques = _round()
    lenient = _lenient(generations, critiques)
    kept = star.filter_accepted(generations, lenient, max_per_prompt=3)
    # Per prompt: 2/3 * min(1, 2/2) = 2/3; 1/1 * min(1, 1/2) = 1/2; 0/1 * 0 = 0; none: 0.
    expected = (2 / 3 + 1 / 2 + 0 + 0) / 4
    assert monitors.balance_score(lenient, kept, target=2) == pytest.approx(expected)


def test_balance_score_of_an_empty_round_is_zero():
    generations, critiques = _round()
    kept = star.filter_accepted(generations, critiques, max_per_prompt=2)
    assert monitors.balance_score(critiques.head(0), kept.head(0), target=2) == 0.0


def test_round_monitors_is_one_flat_dict():
    generations, critiques = _round()
    kept = star.filter_accepted(generations, critiques, max_per_prompt=2)
    found = monitors.round_monitors(generations, critiques, kept, k=2, target=2)
    assert set(found) == {
        "pass_at_k",
        "distinct_correct_per_prompt",
        "answer_diversity",
        "solved_fraction",
        "selection_precision",
        "selection_recall",
        "critic_precision",
        "critic_recall",
        "balance_score",
        "rationalized_share",
        "truncated_share",
    }
    assert all(isinstance(v, float) for v in found.values())


def test_exploration_held_passes():
    previous = {"pass_at_k": 0.8, "distinct_correct_per_prompt": 2.0}
    current = {"pass_at_k": 0.75, "distinct_correct_per_prompt": 1.9}
    gate = monitors.exploration_dropped(current, previous, max_drop_fraction=0.25)
    assert gate.passed
    assert gate.threshold == pytest.approx({"pass_at_k": 0.6, "distinct_correct_per_prompt": 1.5})


def test_exploration_drop_is_flagged_with_its_figures():
    previous = {"pass_at_k": 0.8, "distinct_correct_per_prompt": 2.0}
    # Planted: pass@k fell from 0.8 to 0.5 (-38%), beyond the allowed 25%.
    current = {"pass_at_k": 0.5, "distinct_correct_per_prompt": 1.9}
    gate = monitors.exploration_dropped(current, previous, max_drop_fraction=0.25)
    assert not gate.passed
    assert "pass_at_k 0.800 -> 0.500" in gate.message
    assert "distinct_correct_per_prompt" not in gate.message


def test_first_round_has_nothing_to_drop_from():
    gate = monitors.exploration_dropped({"pass_at_k": 0.1}, None, max_drop_fraction=0.25)
    assert gate.passed
    assert "first round" in gate.message


def test_critique_rates_read_the_first_critic_only():
    # The verifier judged 4 samples (one without an answer); a refiner row must not count.
    frame = pl.DataFrame(
        {
            "critic": ["verifier"] * 4 + ["refiner"],
            "verdict": ["accept", "reject", "reject", "accept", "accept"],
            "correct": [True, False, False, True, True],
            "extracted_answer": ["5", "7", None, "5", "5"],
        }
    )
    assert monitors.critique_rates(frame) == {
        "accept_rate": 0.5,
        "correct_rate": 0.5,
        "no_answer_rate": 0.25,
    }
