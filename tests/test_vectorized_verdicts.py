"""The vectorized numeric judge (`verify_frame`, `verify_rows`) gives exactly the
row-by-row verdicts (`verify`), on random replies built from the pieces each path
treats specially. One corpus per concern; every case is compared in full."""

from __future__ import annotations

import random

import polars as pl
import pytest

from selfimprove_dagster.verifiers import numeric
from selfimprove_dagster.verifiers.verdict import Verdict

# The cascade's markers, numbers in every shape the Python path handles specially
# (thousands, signs, decimals, Unicode minus), and words.
GENERAL = [
    "The answer is", "Answer:", "=", "####", "\\boxed{", "}", " ", "\n", "-", "$", ",", ".",
    "(", ")", "**", "apples", "is", "%", "answer", "0", "7", "12", "3.50", "1,234", "1,2",
    "\u22125", "57.0", "007", "+", "about", "\u00a0", "\r", "12345678901234567890",
]  # fmt: skip
# Thousands separators are read by the Polars path unless a group runs on into a 4th
# digit (",2345", where Python's lookahead changes the number: Python decides).
COMMAS = ["1", "12", "123", "1234", ",", ",", "0", ".", " ", "\n", "= ", "answer is "]
COMMAS += ["$", "-", "x", "**", "(", ")", "####", "\\boxed{", "}", "%"]
DECIMALS = ["0.000001", "1.0000005", "3.1", "3.10000", "= ", "answer ", "x", " ", "\n"]
CUT_OFF = ["Answer:", "answer is", "=", "####", "\\boxed{", "}", " ", "\n", "-", "$", ","]
CUT_OFF += [".", "7", "12", "1,234", "3.50", "\u22125", "\r", "apples", "and then", "**"]

CORPORA = {
    # name: (pieces, pieces per reply, replies, answers, seed, with cut_off)
    "general": (GENERAL, (0, 12), 20_000, ["0", "7", "12", "3.5", "1234", "-5", "2"], 0, False),
    "commas": (COMMAS, (0, 14), 5000, ["1", "1234", "1,234", "123", "1234.5"], 4, False),
    "decimals": (DECIMALS, (1, 6), 3000, ["0", "1", "3.1", "0.0000005", "1.000001"], 1, False),
    "cut_off": (CUT_OFF, (0, 10), 5000, ["7", "12", "1234", "3.5", "-5"], 7, True),
}  # fmt: skip


def _corpus(name: str) -> pl.DataFrame:
    pieces, (low, high), n, answers, seed, with_cut_off = CORPORA[name]
    rng = random.Random(seed)
    completions = [
        "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(low, high)))
        for _ in range(n)
    ]
    return pl.DataFrame(
        {
            "completion": completions,
            "answer": [rng.choice(answers) for _ in completions],
            "cut_off": [with_cut_off and rng.random() < 0.5 for _ in completions],
        }
    )


def _verdicts(out: pl.DataFrame) -> list[Verdict]:
    return [
        Verdict(c, e, r)
        for c, e, r in zip(out["correct"], out["extracted"], out["reason"], strict=True)
    ]


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_vectorized_verdicts_equal_row_by_row_verdicts(name):
    frame = _corpus(name)
    rows = frame.to_dicts()
    expected = [numeric.verify(r["completion"], r["answer"], r["cut_off"]) for r in rows]
    got = _verdicts(numeric.verify_frame(frame))
    mismatches = [
        (r["completion"], e, g) for r, e, g in zip(rows, expected, got, strict=True) if e != g
    ]
    assert not mismatches, mismatches[:5]
    # The batch interface and a precomputed reference column take the same path.
    assert numeric.verify_rows(frame["completion"].to_list(), rows) == expected
    with_reference = frame.with_columns(ref=numeric.references(frame["answer"]))
    assert _verdicts(numeric.verify_frame(with_reference, "ref")) == expected
    if CORPORA[name][5]:
        assert {v.reason for v in expected} >= {"cut_off", "correct", "wrong_answer", "no_answer"}
