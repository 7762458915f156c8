"""A rationale cut off at the token limit is not an answer: with answer_format=rationale,
a sample that stopped at the limit (finish_reason "length") whose number (or option)
was read only from its reasoning (the verifier's last "= N" or last-number finders)
is rejected with reason `cut_off`; a final answer it did write is judged as usual,
and the short format keeps the fallback."""

from __future__ import annotations

import json
import random

import polars as pl
import pytest

from selfimprove_dagster.engines.base import Completion, GenerationEngine, Sampling
from selfimprove_dagster.evaluation import evaluate_policy
from selfimprove_dagster.methods import star
from selfimprove_dagster.methods.recipe import MethodSettings, critique_round, parse_method
from selfimprove_dagster.verifiers import multiple_choice as mc
from selfimprove_dagster.verifiers import numeric
from selfimprove_dagster.verifiers.dispatch import verify_row
from selfimprove_dagster.verifiers.verdict import Verdict

# Reasoning that stopped mid-way: its last number (8) happens to be the reference.
CUT_REASONING = "Let's add the tens first: 20 plus 40 makes 60. Then the ones: 3 plus 5 makes 8"


def _frame_verdicts(out: pl.DataFrame) -> list[Verdict]:
    return [
        Verdict(c, e, r)
        for c, e, r in zip(out["correct"], out["extracted"], out["reason"], strict=True)
    ]


# --- numeric -------------------------------------------------------------------------


def test_cut_off_reasoning_read_only_by_the_last_number_is_cut_off():
    assert numeric.verify(CUT_REASONING, "8") == Verdict(True, "8", "correct")  # not cut off
    assert numeric.verify(CUT_REASONING, "8", cut_off=True) == Verdict(False, None, "cut_off")
    assert verify_row(CUT_REASONING, {"answer": "8", "cut_off": True}).reason == "cut_off"


# A real GSM8K round_000 sample (192-token limit): intermediate arithmetic, cut off; its
# last "= N" is the reference 10.
CUT_AT_EQUALS = (
    "- The bat and ball together are 5:1, so the total is 10:1 (bat + ball = bat + ball "
    "= bat + ball = 5 times bat + 5 times ball).\n- Then, determine the total number of "
    "hours (bat + ball = 5 times bat + 5 times ball = bat + ball = 10:1).\n- Now, "
    "determine the"
)


@pytest.mark.parametrize(
    "completion, answer",
    [(CUT_AT_EQUALS, "10"), ("20 + 40 = 60, 3 + 5 = 8, so 60 + 8 = 68 and", "68")],
)
def test_cut_off_reasoning_read_by_its_last_equals_is_cut_off(completion, answer):
    assert numeric.verify(completion, answer).correct  # not cut off: "= N" is read
    assert numeric.verify(completion, answer, cut_off=True) == Verdict(False, None, "cut_off")
    frame = pl.DataFrame({"completion": [completion], "answer": [answer], "cut_off": [True]})
    assert _frame_verdicts(numeric.verify_frame(frame)) == [Verdict(False, None, "cut_off")]


@pytest.mark.parametrize(
    "completion",
    [
        CUT_REASONING + "\nAnswer: 8\nNow let me check",  # the answer line came before the cut
        CUT_REASONING + ", so the answer is 8 and",
        "\\boxed{68} because 20 plus",
        "#### 68\nThe reasoning",
        "68\nBecause 20 plus 40 makes 60 and 3 plus",  # a bare-number first line
    ],
)
def test_a_cut_off_reply_with_a_final_answer_is_judged_as_usual(completion):
    answer = "8" if "Answer: 8" in completion or "answer is 8" in completion else "68"
    assert numeric.verify(completion, answer, cut_off=True) == numeric.verify(completion, answer)
    assert numeric.verify(completion, answer, cut_off=True).correct


def test_a_cut_off_reply_without_any_number_stays_no_answer():
    verdict = numeric.verify("Let's add the tens first and then", "8", cut_off=True)
    assert verdict == Verdict(False, None, "no_answer")


_PIECES = ["Answer:", "answer is", "=", "####", "\\boxed{", "}", " ", "\n", "-", "$", ","]
_PIECES += [".", "7", "12", "1,234", "3.50", "\u22125", "\r", "apples", "and then", "**"]


# --- multiple choice -----------------------------------------------------------------

CHOICES = {"A": "bank", "B": "library", "C": "park"}


def test_cut_off_reasoning_that_only_names_an_option_is_cut_off():
    text = "Let's think step by step. Books are kept in a library, so the place where"
    row = {"answer": "B", "choices": CHOICES}
    assert mc.verify_row(text, row) == Verdict(True, "B", "correct")
    assert mc.verify_row(text, {**row, "cut_off": True}) == Verdict(False, None, "cut_off")
    answered = text + " you read is B.\nAnswer: B\nThe library"
    assert mc.verify_row(answered, {**row, "cut_off": True}) == Verdict(True, "B", "correct")


def test_choice_frame_agrees_with_rows_on_cut_off():
    rng = random.Random(3)
    shapes = ["Answer: {l}", "{t}", "{l}. {t}", "A. bank\nB. library", "I think the {t} is", "?"]
    completions, cut, labels = [], [], []
    for _ in range(600):
        label = rng.choice(sorted(CHOICES))
        completions.append(rng.choice(shapes).format(l=label, t=CHOICES[label]))
        cut.append(rng.random() < 0.5)
        labels.append(rng.choice(sorted(CHOICES)))
    rows = [
        {"answer": a, "choices": CHOICES, "cut_off": k} for a, k in zip(labels, cut, strict=True)
    ]
    expected = [mc.verify_row(c, r) for c, r in zip(completions, rows, strict=True)]
    assert "cut_off" in {v.reason for v in expected}
    assert mc.verify_rows(completions, rows) == expected  # `verify_frame` with choices
    frame = pl.DataFrame(
        {
            "prompt_id": ["q"] * len(completions),
            "completion": completions,
            "answer": labels,
            "cut_off": cut,
        }
    )
    by_prompt = mc.verify_frame(frame, choices_by_prompt={"q": CHOICES})
    assert _frame_verdicts(by_prompt) == expected


# --- the round's critiques -----------------------------------------------------------


def _round(finish: list[str], texts: list[str]):
    prompts = pl.DataFrame(
        {
            "prompt_id": ["p", "m"],
            "prompt": ["What is 23 + 45?", "Where are books kept?"],
            "answer": ["68", "B"],
            "split": ["train", "train"],
            "verifier": ["numeric", "multiple_choice"],
            "choices": [None, json.dumps(CHOICES)],
        }
    )
    generations = pl.DataFrame(
        {
            "round": ["round_000"] * len(texts),
            "generation_id": [f"g{i}" for i in range(len(texts))],
            "prompt_id": ["p", "p", "p", "m"][: len(texts)],
            "sample_index": list(range(len(texts))),
            "prompt": ["x"] * len(texts),
            "completion": texts,
            "finish_reason": finish,
        }
    )
    return generations, prompts


TEXTS = [
    "First 20 plus 40 makes 60, then 3 plus 5 makes 8, and 60 plus 8 makes 68",  # cut off
    "20 plus 40 makes 60 and 3 plus 5 makes 8, so\nAnswer: 68\nDone",  # cut off, answered
    "First 20 plus 40 makes 60, then 3 plus 5 makes 8, and 60 plus 8 makes 68",  # stopped
    "Books are kept in a library, because",  # cut off
]


def test_rationale_critiques_reject_cut_off_samples():
    generations, prompts = _round(["length", "length", "stop", "length"], TEXTS)
    critiques = star.critique_generations(generations, prompts, answer_format="rationale")
    assert critiques["reason"].to_list() == ["cut_off", "correct", "correct", "cut_off"]
    assert critiques["verdict"].to_list() == ["reject", "accept", "accept", "reject"]
    assert critiques["extracted_answer"].to_list() == [None, "68", "68", None]
    assert critiques["critique"][0] == (
        "cut off at the token limit before a final answer; reference 68"
    )
    verdict = Verdict(False, None, "cut_off")
    assert star.verifier_message(verdict, "68") == critiques["critique"][0]


def test_short_format_keeps_the_last_number_fallback():
    generations, prompts = _round(["length", "length", "stop", "length"], TEXTS)
    short = star.critique_generations(generations, prompts)  # the default: short
    assert short["reason"].to_list() == ["correct"] * 4
    assert short.equals(star.critique_generations(generations.drop("finish_reason"), prompts))


def test_rationale_critiques_in_slices_agree_with_rows(monkeypatch):
    # Judged in slices (a large round): the Polars path gives the row-by-row verdicts.
    rng = random.Random(1)
    texts = [rng.choice(TEXTS[:3]) for _ in range(3000)]
    finish = [rng.choice(["length", "stop"]) for _ in texts]
    generations = pl.DataFrame(
        {
            "round": ["round_000"] * len(texts),
            "generation_id": [f"g{i}" for i in range(len(texts))],
            "prompt_id": ["p"] * len(texts),
            "completion": texts,
            "finish_reason": finish,
        }
    )
    prompts = pl.DataFrame({"prompt_id": ["p"], "answer": ["68"]})
    monkeypatch.setattr(star, "PARALLEL_MIN_ROWS", 1000)
    judged = star.critique_generations(generations, prompts, "rationale")
    expected = [
        numeric.verify(t, "68", f == "length").reason for t, f in zip(texts, finish, strict=True)
    ]
    assert judged["reason"].to_list() == expected
    assert set(expected) == {"cut_off", "correct"}


def test_critique_round_passes_the_answer_format_to_the_verifier():
    generations, prompts = _round(["length", "length", "stop", "length"], TEXTS)

    def no_model():
        raise AssertionError("the verifier critic loads no model")

    sampling = Sampling(max_new_tokens=32)
    for answer_format, reasons in (("rationale", ["correct", "cut_off"]), ("short", ["correct"])):
        result = critique_round(
            parse_method("star"),
            generations,
            prompts,
            no_model,
            sampling,
            MethodSettings(),
            answer_format=answer_format,
        )
        assert sorted(set(result.critiques["reason"])) == reasons


# --- held-out evaluation ---------------------------------------------------------------


class CutOffEngine(GenerationEngine):
    """Reasoning whose last number is the sum, always stopped by the token limit."""

    model_ref = "cut-off"

    def generate(self, prompts, n, sampling, log=None):
        text = "20 plus 40 makes 60, 3 plus 5 makes 8, together 68"
        return [
            Completion(i, s, text, 5, 32, "length") for i in range(len(prompts)) for s in range(n)
        ]


def test_held_out_accuracy_applies_the_same_rule():
    eval_set = pl.DataFrame({"prompt_id": ["p"], "prompt": ["What is 23 + 45?"], "answer": ["68"]})

    def score(answer_format: str):
        return evaluate_policy(
            CutOffEngine(), eval_set, 32, 2, Sampling(max_new_tokens=32), 1, None, answer_format
        )

    short, rationale = score("short"), score("rationale")
    assert (short.accuracy, short.pass_at_k) == (1.0, 1.0)
    assert (rationale.accuracy, rationale.pass_at_k) == (0.0, 0.0)
    assert rationale.details["greedy_answer"].to_list() == [None]
