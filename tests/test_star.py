"""The STaR steps on small fixture frames: critique, filter (accept, dedupe, cap)."""

from __future__ import annotations

import polars as pl

from selfimprove_dagster.engines.base import Completion, Sampling
from selfimprove_dagster.ids import prompt_id
from selfimprove_dagster.methods import star


def _prompts() -> pl.DataFrame:
    texts = ["What is 10 + 20?", "What is 30 + 40?", "What is 11 + 11?"]
    return pl.DataFrame(
        {
            "prompt_id": [prompt_id(t) for t in texts],
            "prompt": texts,
            "answer": ["30", "70", "22"],
            "split": ["train", "train", "eval"],
            "task": ["t"] * 3,
        }
    )


def _generations(texts_per_prompt: list[list[str]]) -> pl.DataFrame:
    prompts = star.train_prompts(_prompts())
    completions = [
        Completion(i, s, text, 5, 3, "stop")
        for i, texts in enumerate(texts_per_prompt)
        for s, text in enumerate(texts)
    ]
    return star.generations_frame("round_000", prompts, completions, "base", Sampling())


def test_generations_carry_ids_and_sampling_settings():
    frame = _generations([["30", "31"], ["70", "7"]])
    assert frame.height == 4
    assert frame["generation_id"].n_unique() == 4
    assert set(frame["policy"]) == {"base"}
    assert frame["temperature"].to_list() == [0.8] * 4


def test_critiques_accept_exactly_the_correct_answers():
    generated = _generations([["30", "The answer is 31."], ["I don't know", "40 + 30 = 70"]])
    critiques = star.critique_generations(generated, _prompts())
    assert critiques["verdict"].to_list() == ["accept", "reject", "reject", "accept"]
    assert critiques["reason"].to_list() == ["correct", "wrong_answer", "no_answer", "correct"]
    assert set(critiques["critic"]) == {"verifier"}


def test_filter_keeps_accepted_dedupes_and_caps_per_prompt():
    generated = _generations(
        [
            ["30", "30 ", "10 + 20 = 30", "The answer is 30", "31"],  # 4 right, 2 identical
            ["71", "72", "73", "74", "75"],  # all wrong: prompt absent from filtered
        ]
    )
    critiques = star.critique_generations(generated, _prompts())
    kept = star.filter_accepted(generated, critiques, max_per_prompt=2)
    assert kept["completion"].to_list() == ["30", "10 + 20 = 30"]  # "30 " is a duplicate
    assert kept["prompt_id"].n_unique() == 1
    assert set(kept["source"]) == {"generated"}


def test_filter_of_all_wrong_round_is_empty_but_typed():
    generated = _generations([["1"], ["2"]])
    kept = star.filter_accepted(
        generated, star.critique_generations(generated, _prompts()), max_per_prompt=2
    )
    assert kept.height == 0
    assert kept.columns == [
        "round",
        "generation_id",
        "prompt_id",
        "prompt",
        "completion",
        "source",
        "hint_used",
    ]


def test_content_hash_ignores_row_order():
    generated = _generations([["30", "10 + 20 = 30"], ["70"]])
    kept = star.filter_accepted(
        generated, star.critique_generations(generated, _prompts()), max_per_prompt=2
    )
    assert star.filtered_content_hash(kept) == star.filtered_content_hash(kept.reverse())


def test_critique_judges_each_row_by_its_verifier_in_order():
    """Numeric, multiple-choice and code prompts in one round: each generation is judged
    by its prompt's verifier, rows keep the generation order, critiques read well."""
    import json

    prompts = pl.DataFrame(
        {
            "prompt_id": ["n", "m", "c"],
            "prompt": ["What is 2 + 2?", "Where are books lent?\nA. bank\nB. library", "Write f."],
            "answer": ["4", "B", "def f(): return 1"],
            "split": ["train"] * 3,
            "verifier": ["numeric", "multiple_choice", "code"],
            "choices": [None, json.dumps({"A": "bank", "B": "library"}), None],
            "tests": [None, None, ["assert f() == 1"]],
            "test_setup": [None, None, ""],
            "entry_point": [None, None, None],
        }
    )
    completions = [
        ("c", "def f():\n    return 2"),
        ("n", "2 + 2 = 4"),
        ("m", "Answer: A"),
        ("c", "```python\ndef f():\n    return 1\n```"),
        ("m", "library"),
    ]
    generations = pl.DataFrame(
        {
            "round": ["round_000"] * 5,
            "generation_id": [f"g{i}" for i in range(5)],
            "prompt_id": [p for p, _ in completions],
            "sample_index": [0, 0, 0, 1, 1],
            "prompt": ["x"] * 5,
            "completion": [c for _, c in completions],
        }
    )
    critiques = star.critique_generations(generations, prompts)
    assert critiques["generation_id"].to_list() == [f"g{i}" for i in range(5)]
    assert critiques["verdict"].to_list() == ["reject", "accept", "reject", "accept", "accept"]
    assert critiques["extracted_answer"].to_list()[1:3] == ["4", "A"]
    assert critiques["critique"][0].startswith("the code fails: test_failed: test 1")
    assert critiques["critique"][3] == "the code passes all tests"
    assert critiques["critique"][2] == "answer A does not match the reference B"
