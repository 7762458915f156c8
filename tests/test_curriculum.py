"""Adaptive curriculum: solve rates per band, band choice, draws; the difficulty knob."""

from __future__ import annotations

import random
import re

import polars as pl
import pytest

from selfimprove_dagster.engines.base import Completion, GenerationEngine, Sampling
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.sources import curriculum as cur
from selfimprove_dagster.sources.tasks import FAMILIES, addition, make_task, problem_key

# --- the difficulty parameter ------------------------------------------------------------


@pytest.mark.parametrize("digits", [1, 2, 3, 4])
def test_addition_digits_band_has_that_many_digits(digits):
    rng = random.Random(0)
    for _ in range(50):
        prompt, answer = addition(rng, digits=digits)
        a, b = map(int, re.findall(r"\d+", prompt))
        assert all(len(str(x)) == digits for x in (a, b))
        assert int(answer) == a + b


def test_operands_band_and_make_task_difficulty():
    prompt, answer = FAMILIES["addition_operands"].bands[4](random.Random(1))
    numbers = list(map(int, re.findall(r"\d+", prompt)))
    assert len(numbers) == 4 and int(answer) == sum(numbers)
    table = make_task("addition_digits", n_train=20, n_eval=10, seed=0, difficulty=3)
    assert table.height == 30
    with pytest.raises(SelfImproveError, match="no difficulty 9"):
        make_task("addition_digits", n_train=1, n_eval=1, seed=0, difficulty=9)
    with pytest.raises(SelfImproveError, match="no difficulty levels"):
        make_task("addition_2digit", n_train=1, n_eval=1, seed=0, difficulty=2)


def test_addition_2_2_asks_what_addition_2digit_asks():
    from selfimprove_dagster.sources.tasks import addition_2digit

    assert addition(random.Random(5), 2, 2) == addition_2digit(random.Random(5))


# --- solve rates ---------------------------------------------------------------------------


def test_solve_rates_join_critiques_to_bands_on_prompt_id():
    prompts = pl.DataFrame(
        {
            "prompt_id": ["p1", "p2", "p3", "p4"],
            "band": [1, 1, 2, None],  # p4: another source, no band
            "split": ["train"] * 4,
        }
    )
    critiques = pl.DataFrame(
        {
            "prompt_id": ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"],
            "correct": [True, True, True, False, False, False, True, True],
        }
    )
    rates = cur.solve_rates(prompts, critiques)
    assert rates.select("band", "prompts", "samples", "correct").rows() == [
        (1, 2, 4, 3),
        (2, 1, 2, 0),
    ]
    assert cur.rates_dict(rates) == {1: 0.75, 2: 0.0}
    assert cur.solve_rates(prompts.drop("band"), critiques).height == 0  # no band column


# --- band choice on fixture solve rates ------------------------------------------------


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ({}, 1),  # round 0: the easiest band
        ({1: 0.95, 2: 0.55, 3: 0.02}, 2),  # band 2 is closest to 0.5
        ({1: 0.30, 2: 0.08, 3: 0.0}, 1),  # everything hard: the easiest
        ({1: 1.0, 2: 0.9, 3: 0.6}, 3),  # policy got better: move up
        ({1: 0.7, 2: 0.3, 3: 0.0}, 2),  # tie at distance 0.2: the harder band
        ({1: 0.98}, 2),  # only band 1 measured and too easy: up to unmeasured band 2
        ({3: 0.0}, 2),  # only band 3 measured, too hard: down to the nearest unmeasured
    ],
)
def test_choose_band_on_fixture_solve_rates(rates, expected):
    band, reason = cur.choose_band(rates, bands=(1, 2, 3), target=0.5)
    assert band == expected
    assert f"band {expected}" in reason


def test_choose_band_reason_names_the_figures_and_respects_target_and_start():
    band, reason = cur.choose_band({1: 0.95, 2: 0.55, 3: 0.02}, (1, 2, 3), target=0.9)
    assert band == 1 and "0.95" in reason and "target 0.90" in reason
    assert cur.choose_band({}, (1, 2, 3), start_band=2) == (
        2,
        "no solve rates measured yet: start at band 2 (target 0.50)",
    )


def test_band_follows_a_rising_solve_rate_across_rounds():
    # The policy improves each round; the chosen band moves up with it.
    history = [{}, {1: 0.35, 2: 0.1, 3: 0.0}, {1: 0.9, 2: 0.45, 3: 0.05}, {1: 1.0, 2: 0.9, 3: 0.4}]
    chosen = [cur.choose_band(r, (1, 2, 3))[0] for r in history]
    assert chosen == [1, 1, 2, 3]


# --- draws ---------------------------------------------------------------------------------


def test_allocate_train_probes_replay_and_chosen():
    plan = cur.allocate_train(100, chosen=3, bands=(1, 2, 3), replay_fraction=0.2, probe_per_band=5)
    assert plan == {
        (1, "probe"): 5,
        (2, "probe"): 5,
        (1, "replay"): 10,
        (2, "replay"): 10,
        (3, "chosen"): 70,
    }
    assert sum(plan.values()) == 100
    easiest = cur.allocate_train(50, chosen=1, bands=(1, 2), replay_fraction=0.2, probe_per_band=5)
    assert easiest == {(2, "probe"): 5, (1, "chosen"): 45}  # nothing easier to replay


def test_draws_keep_the_held_out_set_fixed_and_disjoint():
    config = cur.CurriculumConfig("addition_digits", bands=(1, 2, 3), eval_bands=(3,))
    eval_rows = cur.draw_eval(config, 50, seed=0)
    assert eval_rows == cur.draw_eval(config, 50, seed=0)  # same every round
    assert {b for _, _, b in eval_rows} == {3}
    exclude = {problem_key(p, a) for p, a, _ in eval_rows}
    round_1 = cur.draw_train(config, 3, 60, seed=0, round_number=1, exclude=exclude)
    round_2 = cur.draw_train(config, 3, 60, seed=0, round_number=2, exclude=exclude)
    assert len(round_1) == 60 and round_1 != round_2  # fresh train prompts each round
    keys = [problem_key(p, a) for p, a, _, _ in round_1]
    assert len(set(keys)) == len(keys) and not set(keys) & exclude
    roles = {(b, r) for _, _, b, r in round_1}
    assert roles == {(1, "probe"), (2, "probe"), (1, "replay"), (2, "replay"), (3, "chosen")}


def test_small_band_gives_what_it_has():
    config = cur.CurriculumConfig("addition_digits", bands=(1,), eval_bands=(3,), probe_per_band=0)
    rows = cur.draw_train(config, 1, 500, seed=0, round_number=0, exclude=set())
    assert len(rows) == 100  # 10 x 10 one-digit problems


def test_config_rejects_unknown_bands_and_families():
    with pytest.raises(SelfImproveError, match="not bands"):
        cur.CurriculumConfig("addition_digits", bands=(1, 7))
    with pytest.raises(SelfImproveError, match="unknown task family"):
        cur.CurriculumConfig("chess")
    config = cur.CurriculumConfig("addition_operands")
    assert config.train_bands == (2, 3, 4) and config.held_out_bands == (4,)
    with pytest.raises(SelfImproveError, match="measure 'eval_set' is unknown"):
        cur.CurriculumConfig("addition_digits", measure="eval_set")
    with pytest.raises(SelfImproveError, match="at least 1 problem"):
        cur.CurriculumConfig("addition_digits", measure_per_band=0)


# --- measuring the round's own policy --------------------------------------------------------


class BandSkillEngine(GenerationEngine):
    """Test-only policy whose skill depends on the operands' digits: 1-digit sums always
    right, 2-digit sums right on even samples, 3-digit and longer never."""

    def __init__(self):
        self.model_ref, self.last_stats, self.prompts_seen = "band-skill", {}, []

    def generate(self, prompts, n, sampling, log=None, response_prefix=""):
        self.prompts_seen += prompts
        out = []
        for i, prompt in enumerate(prompts):
            a, b = map(int, re.findall(r"\d+", prompt)[:2])
            digits = len(str(a))
            for s in range(n):
                right = digits == 1 or (digits == 2 and s % 2 == 0)
                out.append(
                    Completion(i, s, f"The answer is {a + b + (0 if right else 1)}.", 9, 6, "stop")
                )
        return out


def test_measure_policy_gives_the_policys_own_solve_rate_per_band():
    config = cur.CurriculumConfig(
        "addition_digits", bands=(1, 2, 3), measure_per_band=6, measure_samples=4
    )
    held_out = {problem_key(p, a) for p, a, _ in cur.draw_eval(config, 20, seed=0)}
    engine = BandSkillEngine()
    rates, samples = cur.measure_policy(engine, config, 0, 1, held_out, Sampling())
    assert cur.rates_dict(rates) == {1: 1.0, 2: 0.5, 3: 0.0}
    assert rates["prompts"].to_list() == [6, 6, 6] and rates["samples"].to_list() == [24] * 3
    assert samples.height == 72 and samples.columns[:3] == ["band", "prompt_id", "prompt"]
    # Measured problems are fresh, never held-out ones, and the choice follows the rates.
    assert not {problem_key(p, a) for p, a in samples.select("prompt", "answer").iter_rows()} & (
        held_out
    )
    assert cur.choose_band(cur.rates_dict(rates), config.train_bands)[0] == 2
    # Another round measures other problems (same seed + round: the same ones).
    _, again = cur.measure_policy(BandSkillEngine(), config, 0, 1, held_out, Sampling())
    _, later = cur.measure_policy(BandSkillEngine(), config, 0, 2, held_out, Sampling())
    assert again["prompt"].to_list() == samples["prompt"].to_list()
    assert set(later["prompt"]) != set(samples["prompt"])


def test_measure_policy_judges_through_the_families_verifier():
    # The families are arithmetic: their problems carry the numeric verifier, and the
    # measurement goes through the dispatch (a GSM8K-style "#### N" reply counts too).
    assert {family.verifier for family in FAMILIES.values()} == {"numeric"}

    class HashEngine(BandSkillEngine):
        def generate(self, prompts, n, sampling, log=None, response_prefix=""):
            out = []
            for i, prompt in enumerate(prompts):
                a, b = map(int, re.findall(r"\d+", prompt)[:2])
                out += [Completion(i, s, f"work...\n#### {a + b}", 9, 6, "stop") for s in range(n)]
            return out

    config = cur.CurriculumConfig("addition_digits", bands=(1,), measure_per_band=3)
    rates, _ = cur.measure_policy(HashEngine(), config, 0, 0, set(), Sampling())
    assert cur.rates_dict(rates) == {1: 1.0}


def _mixed(verifiers: dict[str, str | None]) -> pl.DataFrame:
    """source -> verifier of its rows (one row each)."""
    return pl.DataFrame(
        {"source": list(verifiers), "verifier": list(verifiers.values())},
        schema={"source": pl.String, "verifier": pl.String},
    )


def test_check_mix_refuses_the_curriculum_beside_a_non_numeric_dataset():
    cur.check_mix(_mixed({"curriculum": None, "task": "numeric", "self_instruct": None}))
    cur.check_mix(_mixed({"dataset": "multiple_choice"}))  # no curriculum: nothing to mix
    with pytest.raises(SelfImproveError) as err:
        cur.check_mix(_mixed({"curriculum": None, "dataset": "multiple_choice"}))
    text = str(err.value)
    assert "arithmetic problems" in text and "multiple_choice rows" in text
    assert "SELFIMPROVE_SOURCES=dataset" in text
