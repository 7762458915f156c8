"""Scores of a round: accuracy and the unbiased pass@k estimator."""

from __future__ import annotations

from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples is correct, given c of n were.

    The unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k).
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
