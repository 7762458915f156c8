"""pass@k (unbiased estimator) and the pure quality gates."""

from __future__ import annotations

import math

import polars as pl
import pytest

from selfimprove_dagster.quality import gates as quality
from selfimprove_dagster.quality.metrics import pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 0, 1, 0.0),
        (4, 4, 4, 1.0),
        (4, 1, 1, 0.25),
        (4, 1, 4, 1.0),  # one of four correct: some sample of four is right
        (10, 3, 2, 1 - math.comb(7, 2) / math.comb(10, 2)),
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_min_rows_gate_both_ways():
    assert quality.gate_min_rows(pl.DataFrame({"a": [1, 2]}), 1).passed
    failed = quality.gate_min_rows(pl.DataFrame({"a": []}), 1)
    assert not failed.passed
    assert "fewer than the minimum 1" in failed.message and "Fix:" in failed.message


def test_unique_ids_gate_both_ways():
    assert quality.gate_unique_ids(pl.DataFrame({"generation_id": ["a", "b"]})).passed
    # planted defect: "b" appears twice
    failed = quality.gate_unique_ids(pl.DataFrame({"generation_id": ["a", "b", "b"]}))
    assert not failed.passed
    assert failed.details["duplicates"] == ["b"]


def test_training_gate_catches_nan_loss_and_missing_steps():
    assert quality.gate_training_ran(
        {"optimizer_steps": 4, "planned_steps": 4, "final_loss": 0.3}
    ).passed
    assert not quality.gate_training_ran(
        {"optimizer_steps": 4, "planned_steps": 4, "final_loss": float("nan")}
    ).passed
    assert not quality.gate_training_ran(
        {"optimizer_steps": 2, "planned_steps": 4, "final_loss": 0.3}
    ).passed


def test_generates_gate_both_ways():
    assert quality.gate_generates("What is 1 + 1?", "2", 2).passed
    failed = quality.gate_generates("What is 1 + 1?", "  ", 0)  # planted: empty output
    assert not failed.passed and "generated nothing" in failed.message
    assert failed.details == {"prompt": "What is 1 + 1?", "completion": "  "}
