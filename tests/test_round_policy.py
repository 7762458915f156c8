"""Which checkpoint generates a round (latest vs best) and at which temperature."""

from __future__ import annotations

import polars as pl
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.evolution import round_policy, round_temperature
from selfimprove_dagster.store.storage import RoundStore


def _round(store: RoundStore, key: str, before: float, after: float, **monitors) -> None:
    """A completed round: a checkpoint folder, its generations and its eval_scores row."""
    ckpt = store.checkpoint_dir(key)
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    (ckpt / "adapter_config.json").write_text("{}")
    store.write(key, "generations", pl.DataFrame({"policy": ["p"], "temperature": [0.8]}))
    row = {"round": key, "accuracy_before": before, "accuracy_after": after, **monitors}
    store.write(key, "eval_scores", pl.DataFrame([row]))


@pytest.fixture
def store_with_regression(tmp_path) -> RoundStore:
    store = RoundStore(tmp_path)
    _round(store, "round_000", 0.10, 0.60)
    _round(store, "round_001", 0.60, 0.80)  # the best so far
    _round(store, "round_002", 0.80, 0.30)  # planted regression: never promoted
    return store


def test_best_policy_skips_the_regressed_round(store_with_regression):
    store = store_with_regression
    done = ["round_000", "round_001", "round_002"]
    policy, parent = round_policy(store, "round_003", "base", "best", done)
    assert parent == "round_001"
    assert policy == str(store.checkpoint_dir("round_001").resolve())


def test_latest_policy_takes_the_previous_round(store_with_regression):
    assert round_policy(store_with_regression, "round_003", "base", "latest")[1] == "round_002"


def test_round_zero_and_unknown_mode(store_with_regression):
    assert round_policy(store_with_regression, "round_000", "base", "best", []) == ("base", None)
    with pytest.raises(SelfImproveError, match="Unknown policy mode `newest`"):
        round_policy(store_with_regression, "round_001", "base", "newest")


def test_generation_policy_is_read_back_from_the_round(tmp_path):
    store = RoundStore(tmp_path)
    checkpoint = str(store.checkpoint_dir("round_004").resolve())
    store.write("round_005", "generations", pl.DataFrame({"policy": [checkpoint]}))
    assert store.generation_policy("round_005") == (checkpoint, "round_004")
    store.write("round_000", "generations", pl.DataFrame({"policy": ["embedded:x"]}))
    assert store.generation_policy("round_000") == ("embedded:x", None)


def test_fixed_temperature_unless_auto(tmp_path):
    store = RoundStore(tmp_path)
    _round(store, "round_000", 0.1, 0.5, balance_score=0.1, train_solved_fraction=0.2)
    assert round_temperature(store, "round_001", 0.8, auto=False) == (0.8, "fixed temperature 0.8")
    assert round_temperature(store, "round_000", 0.8, auto=True)[0] == 0.8  # nothing to learn from


def test_auto_temperature_raises_it_when_exploration_is_low(tmp_path):
    store = RoundStore(tmp_path)
    # Low balance and few solved prompts: the policy explores too little at T=0.8.
    _round(
        store,
        "round_000",
        0.1,
        0.5,
        balance_score=0.1,
        train_solved_fraction=0.2,
        selection_precision=1.0,
        train_distinct_correct_per_prompt=0.3,
    )
    temperature, reason = round_temperature(store, "round_001", 0.8, auto=True)
    assert temperature == 1.0
    assert "0.8" in reason and "1" in reason


def test_best_policy_never_picks_a_round_that_is_not_done(store_with_regression):
    """Its eval file exists (round_001 scored best), but Dagster did not record it as
    done (a failed gate, a stale chain): `policy=best` chooses among done rounds only."""
    store = store_with_regression
    _, parent = round_policy(store, "round_003", "base", "best", ["round_000", "round_002"])
    assert parent == "round_000"
    assert round_policy(store, "round_003", "base", "best", []) == ("base", None)
