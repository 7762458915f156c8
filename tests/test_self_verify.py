"""self_verify (SFT-sharpening by the policy's own likelihood): the scorer against a
direct computation, the pick per prompt, its quality figures, and the recipe wiring."""

from __future__ import annotations

import math

import polars as pl
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.methods import self_verify
from selfimprove_dagster.methods.recipe import (
    MethodSettings,
    critique_round,
    method_metrics,
    parse_method,
)
from tests.conftest import ScriptedEngine


@pytest.fixture(scope="module")
def policy(tiny_model, models_dir):
    from selfimprove_dagster.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(tiny_model, models_dir, batch_size=8)
    yield engine
    engine.close()


def test_mean_token_logprobs_match_a_direct_forward_pass(policy):
    import torch

    prompt = policy.chat_text("What is 2 + 3?")
    completions = ["5", "The answer is 5.", ""]
    scores = self_verify.mean_token_logprobs(
        policy.model, policy.tokenizer, [prompt] * 3, completions, batch=2
    )
    assert scores[2] is None  # an empty completion has no tokens to score
    # the padded batch gives what one unpadded sequence gives
    tok = policy.tokenizer
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(completions[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([p + r])).logits[0]
    lp = torch.log_softmax(logits, -1)
    direct = sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(r)) / len(r)
    assert scores[1] == pytest.approx(direct, abs=1e-4)


def _round(prompts: pl.DataFrame) -> pl.DataFrame:
    """Two samples per train prompt: a short right answer and a long wrong one."""
    train = prompts.filter(pl.col("split") == "train").head(3)
    rows = []
    for p in train.iter_rows(named=True):
        for i, text in enumerate([str(p["answer"]), f"I think it is {int(p['answer']) + 1}"]):
            rows.append(
                {
                    "round": "round_000",
                    "generation_id": f"{p['prompt_id']}-{i}",
                    "prompt_id": p["prompt_id"],
                    "sample_index": i,
                    "prompt": p["prompt"],
                    "completion": text,
                }
            )
    return pl.DataFrame(rows)


def test_the_most_likely_sample_of_each_prompt_is_accepted(policy, problems):
    generations = _round(problems)
    critiques = self_verify.critique_by_likelihood(policy, generations, problems)
    assert critiques.height == generations.height
    assert set(critiques["critic"]) == {self_verify.CRITIC}
    per_prompt = critiques.group_by("prompt_id").agg(
        accepted=(pl.col("verdict") == "accept").sum(),
        best=pl.col("mean_logprob").max(),
        picked=pl.col("mean_logprob").filter(pl.col("verdict") == "accept").first(),
    )
    assert per_prompt["accepted"].to_list() == [1] * per_prompt.height
    assert (per_prompt["best"] == per_prompt["picked"]).all()
    # score is the per-token likelihood; ground truth is recorded, not used to pick
    row = critiques.row(0, named=True)
    assert row["score"] == pytest.approx(math.exp(row["mean_logprob"]))
    assert critiques["correct"].to_list() == [True, False] * 3


def test_self_verify_scores_with_the_pooled_engine_a_run_lends_it(policy, problems):
    # In a Dagster run the critiques step gets the engine pool's loan (LentEngine),
    # which only forwards `generate`: self_verify must reach the engine behind it.
    from selfimprove_dagster.engines.pool import LentEngine

    generations = _round(problems)
    lent = self_verify.critique_by_likelihood(LentEngine(policy), generations, problems)
    direct = self_verify.critique_by_likelihood(policy, generations, problems)
    assert lent["verdict"].to_list() == direct["verdict"].to_list()


def test_self_verify_needs_an_engine_that_exposes_log_probs(problems):
    with pytest.raises(SelfImproveError, match="transformers engine"):
        self_verify.critique_by_likelihood(ScriptedEngine("m"), _round(problems), problems)


def test_pick_quality_compares_the_pick_with_random_and_the_oracle():
    critiques = pl.DataFrame(
        {
            "critic": [self_verify.CRITIC] * 4,
            "prompt_id": ["a", "a", "b", "b"],
            "verdict": ["accept", "reject", "accept", "reject"],
            "correct": [True, False, False, False],  # b: nothing right to pick
        }
    )
    quality = self_verify.pick_quality(critiques)
    assert quality == {
        "self_verify_pick_accuracy": 0.5,
        "self_verify_sample_accuracy": 0.25,
        "self_verify_oracle": 0.5,
    }


def test_self_verify_is_a_recipe_that_loads_the_policy_and_trains_sft(
    tiny_model, models_dir, problems
):
    from selfimprove_dagster.engines.transformers_engine import TransformersEngine

    recipe = parse_method("self_verify")
    assert recipe.objective == "sft" and not recipe.online
    loaded = []

    def load_policy():  # critique_round closes the engine it loaded
        loaded.append(True)
        return TransformersEngine(tiny_model, models_dir)

    result = critique_round(
        recipe, _round(problems), problems, load_policy, sampling=None, settings=MethodSettings()
    )
    assert loaded == [True]
    metrics = method_metrics(recipe, result.critiques)
    assert metrics["method"] == "self_verify"
    assert metrics["self_verify_sample_accuracy"] == 0.5
