"""The fast paths of the vectorized judging give the row-by-row verdicts: references
worked out per prompt, the exact string comparison of canonical numbers, the option-text
search without a regex per option, and the filter's rank without a window."""

from __future__ import annotations

import json
import random
import re

import polars as pl
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.methods import star
from selfimprove_dagster.verifiers import multiple_choice as mc
from selfimprove_dagster.verifiers import numeric
from selfimprove_dagster.verifiers.verdict import Verdict
from tests.conftest import SHARED_DATA


def _frame_verdicts(out: pl.DataFrame) -> list[Verdict]:
    return [
        Verdict(c, e, r)
        for c, e, r in zip(out["correct"], out["extracted"], out["reason"], strict=True)
    ]


# --- numeric -------------------------------------------------------------------------


def test_references_match_the_python_reference():
    answers = ["42", "-0", "007", "1.50", "57.0", "1,234", "$12", " 3 ", "x #### 18", "2.5e3"]
    answers = answers[:-1]  # "2.5e3" is not a number: checked below
    got = numeric.references(pl.Series(answers)).to_list()
    assert got == [numeric._reference(a) for a in answers]
    assert numeric.references(pl.Series([7, 12])).to_list() == ["7", "12"]  # not strings


def test_references_strict_raises_and_lenient_gives_null():
    with pytest.raises(SelfImproveError, match="is not a number"):
        numeric.references(pl.Series(["1", "abc"]))
    assert numeric.references(pl.Series(["1", "abc"]), strict=False).to_list() == ["1", None]


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        # Within the tolerance only because of the 6th decimal: Python decides.
        ("0.000001", "0"),
        ("1.000001", "1"),
        ("0.0000015", "0.0000005"),
        ("The answer is 1.0000005", "1"),
        # A float64 difference would round these to 0 (15 digits, then decimals).
        ("100000000000000.000002", "100000000000000"),
        ("123456789012345.123456789012345", "123456789012345.123456789012346"),
        # At most 5 decimals: different canonical strings are different numbers.
        ("1.00001", "1"),
        ("= 3.14159", "3.1416"),
        ("-5", "5"),
        ("x = -5", "-5"),
    ],
)
def test_numeric_frame_decides_near_tolerance_like_python(completion, answer):
    out = numeric.verify_frame(pl.DataFrame({"completion": [completion], "answer": [answer]}))
    assert _frame_verdicts(out) == [numeric.verify(completion, answer)]


# Thousands separators are read by the Polars path unless a group runs on into a 4th
# digit (",2345", where Python's lookahead changes the number: Python decides).
_COMMA_PIECES = ["1", "12", "123", "1234", ",", ",", "0", ".", " ", "\n", "= ", "answer is "]
_COMMA_PIECES += ["$", "-", "x", "**", "(", ")", "####", "\\boxed{", "}", "%"]


@pytest.mark.parametrize(
    "completion",
    ["1,234", "The answer is 1,234.", "= 12,345,678", "1,2345", "1,234,5678", "x1,234", "1,2"],
)
def test_numeric_frame_reads_thousands_like_python(completion):
    out = numeric.verify_frame(pl.DataFrame({"completion": [completion], "answer": ["1234"]}))
    assert _frame_verdicts(out) == [numeric.verify(completion, "1234")]


_DECIMAL_PIECES = ["0.000001", "1.0000005", "3.1", "3.10000", "= ", "answer ", "x", " ", "\n"]


def test_critique_needs_a_usable_reference_only_for_judged_prompts():
    prompts = pl.DataFrame(
        {
            "prompt_id": ["a", "b"],
            "prompt": ["1 + 1?", "unused"],
            "answer": ["2", "not a number"],  # "b" has no generation: no error
            "split": ["train", "eval"],
        }
    )
    generations = pl.DataFrame(
        {"round": ["r"], "generation_id": ["g0"], "prompt_id": ["a"], "completion": ["2"]}
    )
    assert star.critique_generations(generations, prompts)["verdict"].to_list() == ["accept"]
    with pytest.raises(SelfImproveError, match="is not a number"):
        star.critique_generations(generations.with_columns(prompt_id=pl.lit("b")), prompts)


# --- multiple choice -------------------------------------------------------------------


def test_word_spans_equal_the_regex_search():
    words = ["a", "b", "ab", "new york", "york", "store", "department store", "x_y", "é", "!"]
    rng = random.Random(0)
    for _ in range(3000):
        text = mc._norm(" ".join(rng.choice(words) for _ in range(rng.randint(0, 8))))
        phrase = mc._norm(rng.choice([*words, "a a", "b b b"]))
        expected = (
            [m.span() for m in re.finditer(rf"(?<!\w){re.escape(phrase)}(?!\w)", text)]
            if phrase
            else None
        )
        assert mc._word_spans(text, phrase) == expected, (text, phrase)


def test_choice_frame_by_prompt_agrees_with_rows():
    rows = [json.loads(line) for line in (SHARED_DATA / "commonsenseqa/dev.jsonl").open()][:150]
    rng = random.Random(2)
    completions, prompt_ids = [], []
    for i, row in enumerate(rows):
        for _ in range(3):
            label = rng.choice(sorted(row["choices"]))
            text = row["choices"][label]
            completions.append(
                rng.choice(
                    [f"Answer: {label}", text, f"{label}. {text}", "A. x\nB. y", "I don't know"]
                )
            )
            prompt_ids.append(str(i))
    answers = [rows[int(p)]["answer"] for p in prompt_ids]
    frame = pl.DataFrame({"prompt_id": prompt_ids, "completion": completions, "answer": answers})
    by_prompt = {str(i): mc.choice_map(r["choices"]) for i, r in enumerate(rows)}
    out = mc.verify_frame(frame, choices_by_prompt=by_prompt)
    expected = [
        mc.verify_row(c, rows[int(p)]) for c, p in zip(completions, prompt_ids, strict=True)
    ]
    assert _frame_verdicts(out) == expected


def test_choice_critique_with_a_bad_reference_names_the_fix():
    prompts = pl.DataFrame(
        {
            "prompt_id": ["m"],
            "prompt": ["Where?"],
            "answer": ["Z"],
            "split": ["train"],
            "verifier": ["multiple_choice"],
            "choices": [json.dumps({"A": "bank", "B": "library"})],
        }
    )
    generations = pl.DataFrame(
        {"round": ["r"], "generation_id": ["g0"], "prompt_id": ["m"], "completion": ["B"]}
    )
    with pytest.raises(SelfImproveError, match="neither a label nor a choice text"):
        star.critique_generations(generations, prompts)


# --- filter ----------------------------------------------------------------------------


def _filter_with_window(generations, critiques, max_per_prompt):
    # The formulation `filter_accepted` had before its rank became a shift (reference).
    accepted = generations.join(
        critiques.filter(pl.col("verdict") == "accept"), on="generation_id", how="semi"
    )
    return (
        accepted.sort("prompt_id", "sample_index")
        .with_columns(_normalized=pl.col("completion").str.strip_chars().str.to_lowercase())
        .unique(subset=["prompt_id", "_normalized"], keep="first", maintain_order=True)
        .filter(pl.int_range(pl.len()).over("prompt_id") < max_per_prompt)
        .select("generation_id")
    )


def test_filter_rank_equals_the_window_per_prompt():
    rng = random.Random(3)
    for _ in range(100):
        n = rng.randint(1, 30)
        generations = pl.DataFrame(
            {
                "round": ["r"] * n,
                "generation_id": [f"g{i}" for i in range(n)],
                "prompt_id": [rng.choice(["a", "b", "c", None]) for _ in range(n)],
                "sample_index": rng.sample(range(100), n),
                "prompt": ["x"] * n,
                "completion": [rng.choice(["1", " 1", "2", "X", "x "]) for _ in range(n)],
            },
            schema_overrides={"prompt_id": pl.String},
        )
        critiques = pl.DataFrame(
            {
                "generation_id": generations["generation_id"],
                "verdict": [rng.choice(["accept", "reject"]) for _ in range(n)],
            }
        )
        cap = rng.randint(1, 3)
        kept = star.filter_accepted(generations, critiques, cap).select("generation_id")
        assert kept.equals(_filter_with_window(generations, critiques, cap))


# --- judging in slices -------------------------------------------------------------

_REPLY_SHAPES = ["{s}", "The answer is {s}.", "{a} + {b} = {s}", "**{s}**", "I am not sure."]
_REPLY_SHAPES += ["{a} + {b} = {s}.\n\nA helpful", "To calculate {a} + {b}, you simply add"]
_REPLY_SHAPES += ["\\boxed{{{s}}}", "#### {s}", "\u2212{s}", "{s}\r\nok", "= {s:,}", "= -{s}"]


@pytest.mark.skipif(pl.thread_pool_size() < 2, reason="one Polars thread: judged in one piece")
def test_critiques_in_slices_equal_one_piece(monkeypatch):
    # ~120k generations, numeric and multiple-choice prompts interleaved so that prompts
    # straddle the slice boundaries; replies in SmolLM2's shapes, the comma- and
    # decimal-heavy pieces above, and rows the Python path decides (Unicode minus, "\r").
    rng = random.Random(5)
    questions = [json.loads(line) for line in (SHARED_DATA / "commonsenseqa/dev.jsonl").open()][
        :200
    ]
    n_numeric = 2000
    numbers = [(rng.randint(10, 99_999), rng.randint(10, 9_999)) for _ in range(n_numeric)]
    prompts = pl.DataFrame(
        {
            "prompt_id": [f"n{i}" for i in range(n_numeric)] + [f"m{i}" for i in range(200)],
            "prompt": ["x"] * (n_numeric + 200),
            "answer": [str(a + b) for a, b in numbers] + [q["answer"] for q in questions],
            "split": ["train"] * (n_numeric + 200),
            "verifier": ["numeric"] * n_numeric + ["multiple_choice"] * 200,
            "choices": [None] * n_numeric + [json.dumps(q["choices"]) for q in questions],
        }
    )
    pieces = _COMMA_PIECES + _DECIMAL_PIECES
    prompt_ids, completions = [], []
    for _ in range(120_001):
        if rng.random() < 0.1:
            i = rng.randrange(200)
            label = rng.choice(sorted(questions[i]["choices"]))
            text = questions[i]["choices"][label]
            prompt_ids.append(f"m{i}")
            completions.append(rng.choice([f"Answer: {label}", text, f"{label}. {text}", "?"]))
            continue
        i = rng.randrange(n_numeric)
        a, b = numbers[i]
        prompt_ids.append(f"n{i}")
        if rng.random() < 0.2:
            completions.append("".join(rng.choice(pieces) for _ in range(rng.randint(0, 10))))
        else:
            s = a + b + rng.choice([0, 0, 1, -10])
            completions.append(rng.choice(_REPLY_SHAPES).format(a=a, b=b, s=s))
    generations = pl.DataFrame(
        {
            "round": ["r"] * len(completions),
            "generation_id": [f"g{i}" for i in range(len(completions))],
            "prompt_id": prompt_ids,
            "completion": completions,
        }
    )
    assert generations.height >= star.PARALLEL_MIN_ROWS
    sliced = star.critique_generations(generations, prompts)
    monkeypatch.setattr(star, "PARALLEL_MIN_ROWS", 10**9)
    one_piece = star.critique_generations(generations, prompts)
    assert sliced.equals(one_piece)
    assert set(sliced["reason"]) >= {"correct", "wrong_answer", "no_answer"}


# --- the finders' matches stripped to their number, plain numbers as they stand -----


def test_whitespace_chars_are_what_rust_reads_as_whitespace():
    # `numeric._WHITESPACE` strips what the Rust patterns' `\s` matched (White_Space).
    chars = pl.Series([chr(c) for c in range(0x3100)])
    rust = set(chars.filter(chars.str.contains(r"^\s$")).to_list())
    assert rust == set(numeric._WHITESPACE)


# Decoration between a keyword and its number, case-folded letters ("ſ" is an "s" to
# both engines; "ı", "İ" and "\x1f" only to Python's, so those rows go to Python),
# Unicode spaces and digits, and numbers with and without leading zeros and decimals.
_DECORATED_PIECES = ["The ANSWER is", "answer would be", "Answer: approximately", "anſwer iſ"]
_DECORATED_PIECES += ["answer ıs", "equal to", "= $", "=**", "#### $", "\\boxed{", "}", "(", "["]
_DECORATED_PIECES += ["{", "$ ", "\u2003", "\u3000", "\x1f", "\n", " ", "\u0663", "007", "0.50"]
_DECORATED_PIECES += ["1.", ".5", "%", "!", "42", "-", "10", "x", "0", "1,000", "is"]


def test_numeric_frame_agrees_on_decorated_replies():
    rng = random.Random(11)
    completions = [
        "".join(rng.choice(_DECORATED_PIECES) for _ in range(rng.randint(0, 9)))
        for _ in range(8000)
    ]
    answers = [rng.choice(["42", "7", "0.5", "1000", "10"]) for _ in completions]
    out = numeric.verify_frame(pl.DataFrame({"completion": completions, "answer": answers}))
    expected = [numeric.verify(c, a) for c, a in zip(completions, answers, strict=True)]
    mismatches = [
        (c, e, g)
        for c, e, g in zip(completions, expected, _frame_verdicts(out), strict=True)
        if e != g
    ]
    assert not mismatches, mismatches[:5]


def test_canonical_answers_equal_python_canonical():
    # Raw answers as the finders leave them: maybe one character before the number
    # (a "-" before it makes a negative candidate, which Python decides).
    rng = random.Random(12)
    leads = ["", "", " ", "(", "$", "+", "x", "\u2003"]
    numbers = ["5", "57", "007", "0", "57.0", "1.50", "0.0", ".5", "1,234", "$ 12", "-3", "10"]
    raw = [rng.choice(leads) + rng.choice(numbers) for _ in range(3000)] + [None]
    got = numeric.canonical_answers(pl.Series(raw, dtype=pl.String)).to_list()
    expected = [None if r is None else numeric._canonical(re.sub(r"^[^\d$-]", "", r)) for r in raw]
    assert got == expected
