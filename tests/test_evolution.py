"""Stop rules, promotion and B-STaR temperature choice on hand-written round histories."""

from __future__ import annotations

import polars as pl
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.evolution import (
    StopRules,
    choose_policy,
    choose_temperature,
    choose_temperature_from_samples,
    history_through,
    next_round_decision,
    promoted_round,
    rounds_without_improvement,
)


def history(*accuracies: tuple[float, float]) -> pl.DataFrame:
    """One eval_scores row per round: (accuracy_before, accuracy_after)."""
    return pl.DataFrame(
        {
            "round": [f"round_{i:03d}" for i in range(len(accuracies))],
            "accuracy_before": [before for before, _ in accuracies],
            "accuracy_after": [after for _, after in accuracies],
        }
    )


# The measured recipe: 9.5% -> 65% -> 81.5%, each round better than its policy.
IMPROVING = history((0.095, 0.65), (0.65, 0.815))
# Two rounds after the best one (round_001) that do not beat it by 0.5 points.
PLATEAU = history((0.095, 0.65), (0.65, 0.815), (0.815, 0.81), (0.81, 0.812))
# round_002 is the planted regression (80% -> 60%).
REGRESSED = history((0.1, 0.5), (0.5, 0.8), (0.8, 0.6))


# --- next_round_decision -----------------------------------------------------------


def test_an_improving_round_runs_the_next_one():
    decision = next_round_decision(IMPROVING, gates_passed=True, rules=StopRules())
    assert decision.proceed
    assert decision.next_round == "round_002"
    assert decision.reason == "round_001 improved 65.0% -> 81.5% → run round_002"


def test_no_history_starts_round_000():
    decision = next_round_decision(pl.DataFrame(), gates_passed=True, rules=StopRules())
    assert (decision.proceed, decision.next_round) == (True, "round_000")


def test_max_rounds_stops_the_loop():
    four = history((0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5))
    decision = next_round_decision(four, gates_passed=True, rules=StopRules(max_rounds=4))
    assert not decision.proceed
    assert decision.next_round is None
    assert decision.reason == "max rounds reached (4)"


def test_no_improvement_for_patience_rounds_stops_the_loop():
    rules = StopRules(max_rounds=10, patience=2, min_improvement=0.005)
    decision = next_round_decision(PLATEAU, gates_passed=True, rules=rules)
    assert not decision.proceed
    assert decision.reason == "no improvement for 2 rounds (best 81.5% at round_001)"


def test_one_round_without_improvement_is_within_patience():
    rules = StopRules(max_rounds=10, patience=2)
    decision = next_round_decision(PLATEAU.head(3), gates_passed=True, rules=rules)
    assert decision.proceed
    assert decision.next_round == "round_003"
    assert "did not improve (1 of 2 rounds of patience used)" in decision.reason


def test_a_regression_stops_the_loop():
    decision = next_round_decision(REGRESSED, gates_passed=True, rules=StopRules(max_rounds=10))
    assert not decision.proceed
    assert decision.reason == "round_002 regressed 80.0% -> 60.0%"


def test_a_regression_that_also_failed_its_gate_reports_both():
    decision = next_round_decision(
        REGRESSED,
        gates_passed=False,
        rules=StopRules(max_rounds=10),
        failed_gates=["check_no_regression_eval_scores"],
    )
    assert decision.reason == (
        "round_002 regressed 80.0% -> 60.0% "
        "(a blocking gate failed in round_002: check_no_regression_eval_scores)"
    )


def test_a_regression_continues_when_the_rule_is_off():
    rules = StopRules(max_rounds=10, patience=3, stop_on_regression=False)
    decision = next_round_decision(REGRESSED, gates_passed=True, rules=rules)
    assert decision.proceed
    assert decision.next_round == "round_003"


def test_a_drop_within_the_tolerance_is_noise_not_a_regression():
    small_drop = history((0.5, 0.8), (0.8, 0.79))
    assert next_round_decision(small_drop, gates_passed=True, rules=StopRules()).proceed
    strict = StopRules(regression_tolerance=0.0)
    decision = next_round_decision(small_drop, gates_passed=True, rules=strict)
    assert decision.reason == "round_001 regressed 80.0% -> 79.0%"


def test_a_failed_gate_stops_the_loop_and_names_the_gate():
    decision = next_round_decision(
        IMPROVING, gates_passed=False, rules=StopRules(), failed_gates=["check_min_rows_filtered"]
    )
    assert not decision.proceed
    assert decision.reason == "a blocking gate failed in round_001: check_min_rows_filtered"
    bare = next_round_decision(IMPROVING, gates_passed=False, rules=StopRules())
    assert bare.reason == "a blocking gate failed in round_001"


def test_rounds_are_ordered_by_index_not_by_row_order():
    shuffled = IMPROVING.reverse()
    decision = next_round_decision(shuffled, gates_passed=True, rules=StopRules())
    assert decision.next_round == "round_002"


def test_rounds_without_improvement_counts_from_the_best_so_far():
    assert rounds_without_improvement(IMPROVING, 0.005) == 0
    assert rounds_without_improvement(PLATEAU, 0.005) == 2
    # A round that beats the best by less than min_improvement does not reset the count.
    assert rounds_without_improvement(history((0.5, 0.6), (0.6, 0.601)), 0.005) == 1


def test_stop_rules_reject_nonsense():
    with pytest.raises(SelfImproveError, match="patience"):
        StopRules(patience=0)


def test_history_through_drops_later_rounds():
    assert history_through(PLATEAU, "round_001")["round"].to_list() == ["round_000", "round_001"]
    assert history_through(PLATEAU, None).height == PLATEAU.height


# --- promotion -------------------------------------------------------------------------


def test_promotion_skips_a_regressed_round():
    # round_002 scored 60% (below its policy's 80%); round_001's 80% is promoted.
    assert promoted_round(REGRESSED) == "round_001"


def test_promotion_ignores_a_regressed_round_even_with_the_highest_score():
    # round_001 has the highest accuracy_after (0.9) but regressed from its policy (0.95).
    frame = history((0.1, 0.5), (0.95, 0.9), (0.5, 0.7))
    assert promoted_round(frame) == "round_002"
    assert promoted_round(frame, tolerance=0.1) == "round_001"


def test_promotion_ties_go_to_the_earliest_round():
    assert promoted_round(history((0.1, 0.7), (0.7, 0.7))) == "round_000"


def test_nothing_is_promoted_before_a_good_round():
    assert promoted_round(pl.DataFrame()) is None
    assert promoted_round(history((0.5, 0.2))) is None


def test_policy_latest_follows_the_last_round_and_best_rolls_back():
    assert choose_policy(REGRESSED, "latest") == "round_002"
    assert choose_policy(REGRESSED, "best") == "round_001"
    assert choose_policy(pl.DataFrame(), "latest") is None


def test_unknown_policy_mode_is_an_error():
    with pytest.raises(SelfImproveError, match="latest, best"):
        choose_policy(IMPROVING, "newest")


# --- B-STaR temperature ------------------------------------------------------------


def monitors(**overrides: float | None) -> dict[str, float | None]:
    """A balanced round: precise filter, most prompts solved, balance mid-high."""
    row: dict[str, float | None] = {
        "selection_precision": 1.0,
        "balance_score": 0.7,
        "train_solved_fraction": 0.75,
        "train_distinct_correct_per_prompt": 1.4,
    }
    return {**row, **overrides}


def test_low_exploration_raises_the_temperature():
    # Round 0 of the recipe: a quarter of the prompts get a correct sample.
    row = monitors(balance_score=0.25, train_solved_fraction=0.25)
    temperature, reason = choose_temperature(row, current=0.8)
    assert temperature == 1.0
    assert reason.startswith("raise T 0.8 -> 1: exploration low")
    assert "balance 0.25" in reason and "solved 0.25" in reason


def test_poor_exploitation_lowers_the_temperature():
    temperature, reason = choose_temperature(monitors(selection_precision=0.7), current=1.0)
    assert temperature == 0.8
    assert reason.startswith("lower T 1 -> 0.8: exploitation poor")
    assert "selection precision 0.70" in reason


def test_saturated_exploration_lowers_the_temperature():
    row = monitors(balance_score=0.96, train_solved_fraction=0.97)
    temperature, reason = choose_temperature(row, current=0.8)
    assert temperature == 0.6
    assert "exploration saturated" in reason


def test_a_balanced_round_keeps_the_temperature():
    temperature, reason = choose_temperature(monitors(), current=0.8)
    assert temperature == 0.8
    assert reason.startswith("keep T=0.8: exploration and exploitation balanced")


def test_the_grid_edges_hold():
    low = monitors(balance_score=0.1, train_solved_fraction=0.1)
    temperature, reason = choose_temperature(low, current=1.2)
    assert temperature == 1.2
    assert "already at the top of the grid" in reason


def test_missing_monitors_keep_the_temperature():
    temperature, reason = choose_temperature(monitors(balance_score=None), current=1.0)
    assert temperature == 1.0
    assert "monitors missing" in reason


def test_an_off_grid_temperature_snaps_to_the_nearest():
    temperature, _ = choose_temperature(monitors(), current=0.75)
    assert temperature == 0.8


def test_measured_balance_picks_the_argmax():
    temperature, reason = choose_temperature_from_samples({0.6: 0.4, 0.8: 0.55, 1.0: 0.62})
    assert temperature == 1.0
    assert reason.startswith("T=1 has the highest balance score 0.620")


def test_measured_balance_ties_prefer_current_then_lower():
    scores = {0.6: 0.5, 0.8: 0.7, 1.0: 0.7}
    assert choose_temperature_from_samples(scores)[0] == 0.8
    assert choose_temperature_from_samples(scores, current=1.0)[0] == 1.0
