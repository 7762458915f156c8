"""One meaning of "done" (`evolution.RoundState.done`) for everything that picks a
policy or a next round: a round whose eval file exists but whose gates failed, or whose
chain went stale, is never chosen. Pure: snapshots of Dagster's record, no Dagster."""

from __future__ import annotations

import polars as pl

from selfimprove_dagster.evolution import (
    RecordSnapshot,
    RoundState,
    StopRules,
    decide_next,
    promotion,
)

DONE = RoundState("round_000", materialized=True)
GATE_FAILED = RoundState("round_001", materialized=True, failed_gates=("check_min_rows_filtered",))
STALE = RoundState("round_001", materialized=True, newer=("checkpoint",))
CHAIN_STALE = RoundState(
    "round_001", materialized=True, chain_problem="round_000's adapter changed since"
)
NEVER_RAN = RoundState("round_001", materialized=False, has_runs=False)
CRASHED = RoundState("round_001", materialized=False, has_runs=True)

SCORES = {  # every round has an eval_scores row, the failed and stale ones too
    "round_000": {"round": "round_000", "accuracy_before": 0.1, "accuracy_after": 0.5},
    "round_001": {"round": "round_001", "accuracy_before": 0.5, "accuracy_after": 0.9},
}


def history(rounds) -> pl.DataFrame:
    return pl.DataFrame([SCORES[r] for r in rounds]) if rounds else pl.DataFrame()


def test_done_needs_the_record_the_gates_and_a_current_chain():
    assert DONE.done
    assert not GATE_FAILED.done and "a blocking gate failed in round_001" in GATE_FAILED.problem()
    assert not STALE.done and "round_001 is stale: checkpoint" in STALE.problem()
    assert not CHAIN_STALE.done and CHAIN_STALE.problem().startswith("round_000's adapter")
    assert not NEVER_RAN.done and not CRASHED.done


def test_the_next_round_never_builds_on_a_failed_or_stale_round():
    rules = StopRules(max_rounds=10)
    failed = decide_next(RecordSnapshot((DONE, GATE_FAILED)), history, rules)
    assert not failed.decision.proceed
    assert "check_min_rows_filtered" in failed.decision.reason
    stale = decide_next(RecordSnapshot((DONE, STALE)), history, rules)
    assert not stale.decision.proceed and "stale" in stale.decision.reason
    crashed = decide_next(RecordSnapshot((DONE, CRASHED)), history, rules)
    assert not crashed.decision.proceed and "did not complete" in crashed.decision.reason


def test_a_partition_added_but_never_run_is_the_next_round():
    plan = decide_next(RecordSnapshot((DONE, NEVER_RAN)), history, StopRules(max_rounds=10))
    assert plan.decision.proceed and plan.decision.next_round == "round_001"
    assert not plan.add_partition  # it exists already


def test_a_running_round_and_a_broken_chain_wait():
    running = decide_next(
        RecordSnapshot((DONE,), running="round_job is running"), history, StopRules()
    )
    assert running.decision.reason == "round_job is running"
    chain_broken = RoundState("round_000", materialized=True, chain_problem="adapter changed")
    broken = decide_next(RecordSnapshot((chain_broken,)), history, StopRules(max_rounds=10))
    assert broken.decision.reason == "not building on round_000: adapter changed"


def test_promotion_reads_done_rounds_only():
    for not_done in (GATE_FAILED, STALE, CHAIN_STALE):  # each scored best (0.9)
        snapshot = RecordSnapshot((DONE, not_done))
        assert promotion(history(snapshot.done_rounds())).round == "round_000"
