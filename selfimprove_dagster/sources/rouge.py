"""ROUGE-L on word tokens: the similarity Self-Instruct filters near-duplicate
instructions with, and the agreement Ensemble-Instruct picks a consensus output by.

ROUGE-L (Lin, 2004) is an F-measure over the longest common subsequence (LCS) of two
token sequences: P = LCS / len(candidate), R = LCS / len(reference),
F = 2PR / (P + R) (β = 1, as in `rouge_score`'s `rougeL`). Tokens are lowercase runs
of letters and digits, so punctuation and case do not count.

    >>> round(rouge_l("Write a poem about the sea.", "Write a poem about the ocean"), 3)
    0.833
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_TOKEN_RE = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase alphanumeric tokens ("Don't panic!" -> ["don", "t", "panic"])."""
    return _TOKEN_RE.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len a · len b))."""
    if len(a) < len(b):
        a, b = b, a  # keep the row the shorter sequence
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(
                previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1])
            )
        previous = current
    return previous[-1]


def rouge_l(candidate: str | Sequence[str], reference: str | Sequence[str]) -> float:
    """ROUGE-L F-measure of two texts (or token lists), in [0, 1]; 0 when either is empty."""
    a = tokenize(candidate) if isinstance(candidate, str) else list(candidate)
    b = tokenize(reference) if isinstance(reference, str) else list(reference)
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def most_similar(text: str, others: Sequence[str]) -> tuple[float, int | None]:
    """(highest ROUGE-L of `text` against `others`, index of that text); (0, None) if none."""
    tokens = tokenize(text)
    best, where = 0.0, None
    for i, other in enumerate(others):
        score = rouge_l(tokens, tokenize(other))
        if score > best:
            best, where = score, i
    return best, where


def consensus(samples: Sequence[str]) -> tuple[int | None, float, list[float]]:
    """Ensemble-Instruct's agreement: the sample with the highest mean ROUGE-L to the
    other samples, that mean, and every sample's mean.

    Ties go to the earliest sample. Fewer than two samples have no agreement to
    measure: (0, 0.0, [0.0]) for one sample, (None, 0.0, []) for none.
    """
    if not samples:
        return None, 0.0, []
    if len(samples) == 1:
        return 0, 0.0, [0.0]
    tokens = [tokenize(s) for s in samples]
    n = len(tokens)
    pair = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            pair[i][j] = pair[j][i] = rouge_l(tokens[i], tokens[j])
    means = [sum(row) / (n - 1) for row in pair]
    best = max(range(n), key=lambda i: (means[i], -i))
    return best, means[best], means
