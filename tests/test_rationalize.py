"""STaR rationalization on frames: unsolved train prompts get hinted samples, accepted
rationales train on the prompt without the hint (source=rationalized, hint_used), and
the monitors count them."""

from __future__ import annotations

import re

import polars as pl
import pytest

from selfimprove_dagster.engines.base import Completion, GenerationEngine, Sampling
from selfimprove_dagster.methods import rationalize, star
from selfimprove_dagster.methods.recipe import MethodSettings, critique_round, parse_method
from selfimprove_dagster.quality import monitors
from selfimprove_dagster.sources.answer_format import apply_answer_format
from selfimprove_dagster.sources.tasks import make_task

SAMPLING = Sampling(temperature=0.8, max_new_tokens=64, seed=0)


class HintReader(GenerationEngine):
    """Test-only policy: wrong without a hint; with one, sample 0 writes a rationale that
    reaches the hinted answer and sample 1 cites the hint (which must be rejected)."""

    model_ref = "hint-reader"

    def __init__(self) -> None:
        self.prompts_seen: list[str] = []

    def generate(self, prompts, n, sampling, log=None):
        self.prompts_seen += prompts
        out = []
        for i, prompt in enumerate(prompts):
            hint = re.search(r"the correct answer is (\S+?)\.", prompt)
            for s in range(n):
                if hint is None:
                    text = "I think so.\nAnswer: 1"
                elif s == 0:
                    text = f"Adding the two numbers step by step.\nAnswer: {hint.group(1)}"
                else:
                    text = f"The hint says {hint.group(1)}.\nAnswer: {hint.group(1)}"
                out.append(Completion(i, s, text, 20, 12, "stop"))
        return out


@pytest.fixture
def round_frames():
    prompts = apply_answer_format(make_task("addition_2digit", 4, 2, seed=0), "rationale")
    prompts = prompts.with_columns(round=pl.lit("round_000"))
    engine = HintReader()
    generations = star.sample_generations(engine, prompts, "round_000", 2, SAMPLING)
    return prompts, generations, engine


def test_rationalized_rows_train_without_the_hint(round_frames):
    prompts, generations, engine = round_frames
    settings = MethodSettings(rationalize=True, rationalize_samples=2)
    result = critique_round(
        parse_method("star"), generations, prompts, lambda: engine, SAMPLING, settings
    )
    rationalizer = result.critiques.filter(pl.col("critic") == "rationalizer")
    assert rationalizer.height == 4 * 2  # every train prompt was unsolved, 2 hinted samples
    assert sorted(rationalizer["reason"].unique()) == ["correct", "mentions_hint"]

    filtered = star.filter_accepted(generations, result.critiques, 1, result.refinements)
    assert filtered.height == 4
    assert set(filtered["source"]) == {"rationalized"}
    train = star.train_prompts(prompts)
    assert sorted(filtered["prompt"]) == sorted(train["prompt"])  # the prompt without the hint
    assert not any("Hint" in p for p in filtered["prompt"])
    assert sorted(filtered["hint_used"]) == sorted(train["answer"])
    assert any("Hint: the correct answer is" in p for p in engine.prompts_seen)

    figures = monitors.data_sources(generations, filtered)
    assert figures["rationalized_share"] == 1.0
    assert rationalize.rationalized_share(filtered) == 1.0


class CutOffHintReader(HintReader):
    """Test-only policy: with a hint, every sample stops at the token limit mid-way,
    the hinted number its last number ("... so far 57, then"), no final answer line."""

    def generate(self, prompts, n, sampling, log=None):
        def cut(c: Completion) -> Completion:
            hint = re.search(r"the correct answer is (\S+?)\.", prompts[c.prompt_index])
            if hint is None:
                return c
            text = f"Step 1: add the tens. Step 2: so far {hint.group(1)}, then"
            return Completion(c.prompt_index, c.sample_index, text, 20, 64, "length")

        return [cut(c) for c in super().generate(prompts, n, sampling, log)]


@pytest.mark.parametrize("answer_format, kept", [("rationale", 0), ("short", 4)])
def test_a_hinted_rationale_cut_off_before_its_answer_is_not_kept(
    round_frames, answer_format, kept
):
    prompts, generations, _ = round_frames
    engine = CutOffHintReader()
    settings = MethodSettings(rationalize=True, rationalize_samples=1)
    result = critique_round(
        parse_method("star"),
        generations,
        prompts,
        lambda: engine,
        SAMPLING,
        settings,
        answer_format=answer_format,
    )
    rationalizer = result.critiques.filter(pl.col("critic") == "rationalizer")
    expected = "cut_off" if answer_format == "rationale" else "correct"
    assert set(rationalizer["reason"]) == {expected}
    filtered = star.filter_accepted(generations, result.critiques, 1, result.refinements)
    assert filtered.height == kept


def test_solved_prompts_and_code_rows_are_not_rationalized(round_frames):
    prompts, generations, _ = round_frames
    critiques = star.critique_generations(generations, prompts)
    solved_id = star.train_prompts(prompts)["prompt_id"][0]
    critiques = critiques.with_columns(
        verdict=pl.when(pl.col("prompt_id") == solved_id)
        .then(pl.lit("accept"))
        .otherwise("verdict")
    )
    unsolved = rationalize.unsolved_prompts(prompts, critiques, max_prompts=10)
    assert solved_id not in unsolved["prompt_id"].to_list()
    assert unsolved.height == 3
    as_code = prompts.with_columns(verifier=pl.lit("code"))
    assert rationalize.unsolved_prompts(as_code, critiques, 10).height == 0


def test_without_rationalize_nothing_is_hinted(round_frames):
    prompts, generations, engine = round_frames
    result = critique_round(
        parse_method("star"), generations, prompts, lambda: engine, SAMPLING, MethodSettings()
    )
    assert result.refinements is None
    assert set(result.critiques["critic"]) == {"verifier"}


def test_multiple_choice_hint_shows_label_and_text():
    row = {"answer": "B", "verifier": "multiple_choice", "choices": '{"A": "bank", "B": "library"}'}
    assert rationalize.hint_text(row) == "B (library)"


def test_truncation_warning_names_the_share_and_the_setting():
    from selfimprove_dagster.quality.gates import gate_truncation

    frame = pl.DataFrame({"finish_reason": ["length"] * 3 + ["stop"], "max_new_tokens": [16] * 4})
    gate = gate_truncation(frame, max_share=0.5)
    assert not gate.passed and gate.observed == 0.75
    assert "3 of 4 samples (75%) stopped at the token limit of 16" in gate.message
    assert "SELFIMPROVE_MAX_NEW_TOKENS" in gate.message
    assert gate_truncation(frame.tail(1), max_share=0.5).passed


def test_rationale_format_raises_the_token_budget_unless_set():
    from selfimprove_dagster.resources.settings import resolve_settings

    def generator(environ):
        return resolve_settings("demo", {}, "SELFIMPROVE_", environ)["generator"]

    assert generator({}).max_new_tokens == 16
    rationale = {"SELFIMPROVE_ANSWER_FORMAT": "rationale"}
    assert generator(rationale).max_new_tokens == 256
    explicit = {**rationale, "SELFIMPROVE_MAX_NEW_TOKENS": "96"}
    assert generator(explicit).max_new_tokens == 96


class LetterB(GenerationEngine):
    """Test-only policy: always answers B; with a hint, the hinted label."""

    model_ref = "letter-b"

    def generate(self, prompts, n, sampling, log=None):
        out = []
        for i, prompt in enumerate(prompts):
            hint = re.search(r"the correct answer is ([A-E])", prompt)
            label = hint.group(1) if hint else "B"
            out += [Completion(i, s, f"Thinking.\nAnswer: {label}", 9, 6, "stop") for s in range(n)]
        return out


def test_multiple_choice_round_from_the_prompts_table():
    """CommonsenseQA rows as the round's tables hold them (choices as JSON): critique,
    rationalization and held-out evaluation all read them."""
    from selfimprove_dagster.evaluation import evaluate_policy
    from selfimprove_dagster.sources.datasets import load_commonsenseqa
    from tests.conftest import SHARED_DATA

    table = load_commonsenseqa(SHARED_DATA / "commonsenseqa", n_train=6, n_eval=5)
    prompts = apply_answer_format(table, "rationale").with_columns(round=pl.lit("round_000"))
    engine = LetterB()
    generations = star.sample_generations(engine, prompts, "round_000", 2, SAMPLING)
    settings = MethodSettings(rationalize=True, rationalize_samples=1)
    result = critique_round(
        parse_method("star"), generations, prompts, lambda: engine, SAMPLING, settings
    )
    train = star.train_prompts(prompts)
    right = train.filter(pl.col("answer") == "B").height
    verifier_rows = result.critiques.filter(pl.col("critic") == "verifier")
    assert int((verifier_rows["verdict"] == "accept").sum()) == 2 * right
    filtered = star.filter_accepted(generations, result.critiques, 1, result.refinements)
    assert filtered.height == train.height  # the rest were learned from hints
    assert int((filtered["source"] == "rationalized").sum()) == train.height - right

    scores = evaluate_policy(engine, star.eval_prompts(prompts), 32, 0, SAMPLING, 0)
    eval_b = star.eval_prompts(prompts).filter(pl.col("answer") == "B").height
    assert scores.accuracy == pytest.approx(eval_b / 5)
