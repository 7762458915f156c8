"""The critique-driven methods as pure functions on small frames: recipe parsing,
majority vote, rubric parsing, preference pairs, refinement bookkeeping."""

from __future__ import annotations

import polars as pl
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.methods import consistency, judge, refine, star
from selfimprove_dagster.methods import recipe as methods
from selfimprove_dagster.prompting import load_template, render
from selfimprove_dagster.store.schemas import METRIC_COLUMNS


def _generations(answers: dict[str, list[str]], round_: str = "round_000") -> pl.DataFrame:
    """One row per (prompt, sample) with the given completion texts."""
    rows = [
        {
            "round": round_,
            "generation_id": f"{prompt_id}-{i}",
            "prompt_id": prompt_id,
            "sample_index": i,
            "prompt": f"question {prompt_id}",
            "completion": text,
        }
        for prompt_id, texts in answers.items()
        for i, text in enumerate(texts)
    ]
    return pl.DataFrame(rows)


def _prompts(references: dict[str, str | None]) -> pl.DataFrame:
    return pl.DataFrame(
        {"prompt_id": list(references), "answer": list(references.values())},
        schema={"prompt_id": pl.String, "answer": pl.String},
    )


# --- recipes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "critic", "refine_on", "objective"),
    [
        ("star", "star", False, "sft"),
        ("self_consistency", "self_consistency", False, "sft"),
        ("self_judge", "self_judge", False, "dpo"),
        ("self_refine", "star", True, "sft"),
        ("star+self_refine", "star", True, "sft"),
        (" Self_Consistency + self_refine ", "self_consistency", True, "sft"),
    ],
)
def test_parse_method(text, critic, refine_on, objective):
    recipe = methods.parse_method(text)
    assert (recipe.critic, recipe.refine, recipe.objective) == (critic, refine_on, objective)


@pytest.mark.parametrize("text", ["", "rlhf", "star+self_judge", "self_judge+self_refine"])
def test_unknown_or_incompatible_method_names_the_fix(text):
    with pytest.raises(SelfImproveError, match="Fix: use"):
        methods.parse_method(text)


# --- self-consistency ----------------------------------------------------------------


def test_majority_vote_takes_the_most_common_answer():
    vote = consistency.majority_vote(["68", "68", "67", None], threshold=0.5)
    assert (vote.label, vote.votes, vote.n, vote.reason) == ("68", 2, 4, "majority")
    assert vote.agreement == 0.5


def test_majority_vote_tie_gives_no_label():
    vote = consistency.majority_vote(["68", "68", "67", "67"], threshold=0.25)
    assert vote.label is None and vote.reason == "tie"


def test_majority_vote_below_threshold_gives_no_label():
    # 2 of 5 agree: the most common answer, but below 50% of all samples (the
    # unanswered ones count: they did not agree).
    vote = consistency.majority_vote(["68", "68", "67", None, None], threshold=0.5)
    assert vote.label is None and vote.reason == "below_threshold"


def test_majority_vote_without_answers():
    assert consistency.majority_vote([None, None], 0.5).reason == "no_answers"


def test_critique_by_majority_accepts_agreeing_samples():
    generations = _generations({"p1": ["68", "The answer is 68", "67", "none"]})
    frame = consistency.critique_by_majority(generations, _prompts({"p1": "68"}), 0.5)
    assert frame["critic"].unique().to_list() == ["majority_vote"]
    assert frame["verdict"].to_list() == ["accept", "accept", "reject", "reject"]
    assert frame["reason"].to_list() == ["agrees", "agrees", "disagrees", "no_answer"]
    assert frame["pseudo_label"].to_list() == ["68"] * 4
    assert frame["score"].to_list() == [0.5, 0.5, 0.25, 0.0]
    assert frame["critique"][0] == "majority answer 68 (2/4 samples)"


def test_critique_by_majority_never_selects_with_ground_truth():
    generations = _generations({"p1": ["5", "5", "6"], "p2": ["7", "8", "9"]})
    right = consistency.critique_by_majority(generations, _prompts({"p1": "5", "p2": "7"}), 0.5)
    wrong = consistency.critique_by_majority(generations, _prompts({"p1": "6", "p2": "9"}), 0.5)
    unlabeled = consistency.critique_by_majority(
        generations, _prompts({"p1": None, "p2": None}), 0.5
    )
    assert right["verdict"].to_list() == wrong["verdict"].to_list()
    assert right["verdict"].to_list() == unlabeled["verdict"].to_list()
    assert unlabeled["correct"].is_null().all()  # no reference: correctness unknown


def test_pseudo_label_quality_against_ground_truth():
    generations = _generations(
        {
            "right": ["5", "5", "6"],  # label 5 = reference: right
            "wrong": ["7", "7", "8"],  # label 7, reference 8: wrong (and solvable)
            "tie": ["1", "2", "3"],  # no label; reference 3 was sampled: solvable
            "unsolved": ["4", "4", "4"],  # label 4, reference 9: wrong, not solvable
        }
    )
    prompts = _prompts({"right": "5", "wrong": "8", "tie": "3", "unsolved": "9"})
    quality = consistency.pseudo_label_quality(
        consistency.critique_by_majority(generations, prompts, 0.5)
    )
    assert quality["pseudo_labeled_prompts"] == 3
    assert quality["pseudo_label_precision"] == pytest.approx(1 / 3)
    assert quality["pseudo_label_recall"] == pytest.approx(1 / 3)  # 1 right of 3 solvable


# --- self-judge ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "points"),
    [
        ("Score: 4. The answer is right.", 4.0),
        ("**Score:** 3 points", 3.0),
        ("score = 8/10", 4.0),
        ("The score is 5", 5.0),
        ("2", 2.0),
        ("4/5.", 4.0),
        ("Score: 0", 0.0),
    ],
)
def test_parse_judge_score(reply, points):
    assert judge.parse_judge_score(reply) == pytest.approx(points)


@pytest.mark.parametrize(
    "reply",
    ["", "I think it is good", "Score: 12", "Score: 3/0", "The answer 68 is right", "-1"],
)
def test_parse_judge_score_garbage_is_none(reply):
    assert judge.parse_judge_score(reply) is None


def test_judge_prompt_fills_the_rubric_template():
    text = judge.judge_prompt("What is {answer} + 2?", "4")
    assert "scale of 1 to 5" in text
    assert "Question: What is {answer} + 2?" in text  # braces in a value are left alone
    assert "Response: 4" in text


def _judged(scores: dict[str, float | None]) -> pl.DataFrame:
    return pl.DataFrame(
        {"generation_id": list(scores), "score": list(scores.values())},
        schema={"generation_id": pl.String, "score": pl.Float64},
    )


def test_preference_pairs_best_vs_worst_above_margin():
    generations = _generations({"p1": ["a", "b", "c"], "p2": ["d", "e"], "p3": ["f", "g"]})
    critiques = _judged(
        {
            "p1-0": 0.4,
            "p1-1": 1.0,  # best of p1
            "p1-2": 0.2,  # worst of p1
            "p2-0": 0.6,
            "p2-1": 0.6,  # equal scores: no pair
            "p3-0": 0.8,
            "p3-1": 0.7,  # gap 0.1 < margin 0.2: no pair
        }
    )
    pairs = judge.preference_pairs(generations, critiques, margin=0.2)
    assert pairs.height == 1
    pair = pairs.row(0, named=True)
    assert (pair["completion"], pair["rejected_completion"]) == ("b", "c")
    assert pair["margin"] == pytest.approx(0.8)
    assert pair["generation_id"] == "p1-1" and pair["rejected_generation_id"] == "p1-2"


def test_preference_pairs_skip_unscored_answers_and_identical_texts():
    generations = _generations({"p1": ["a", "unreadable"], "p2": ["same", " same "]})
    critiques = _judged({"p1-0": 1.0, "p1-1": None, "p2-0": 1.0, "p2-1": 0.0})
    assert judge.preference_pairs(generations, critiques, margin=0.2).height == 0


def test_judge_quality_counts_unparseable_and_pair_accuracy():
    critiques = pl.DataFrame(
        {
            "generation_id": ["a", "b", "c", "d"],
            "critic": ["policy_judge"] * 4,
            "verdict": ["accept", "reject", "accept", "reject"],
            "correct": [True, False, False, False],
            "score": [1.0, 0.2, 0.8, None],
            "judge_replies": [3, 3, 3, 3],
            "judge_parsed": [3, 2, 1, 0],  # d: no reply had a score
        }
    )
    pairs = pl.DataFrame({"generation_id": ["a", "c"], "rejected_generation_id": ["b", "b"]})
    quality = judge.judge_quality(critiques, pairs)
    assert quality["judge_unparseable_rate"] == pytest.approx(6 / 12)
    assert quality["judge_unscored"] == 1
    assert quality["judge_accuracy"] == pytest.approx(3 / 4)  # c is a false accept
    # (a, b) differ in correctness and a is right; (c, b) are both wrong: not counted.
    assert quality["pair_accuracy"] == 1.0
    assert quality["pairs"] == 2


# --- self-refine ---------------------------------------------------------------------


def _star_round():
    generations = _generations(
        {
            "solved": ["5", "6"],  # sample 0 right
            "unsolved": ["1", "2"],  # both wrong (reference 3)
            "blank": ["no idea", "?"],  # no answer at all (reference 4)
        }
    )
    prompts = _prompts({"solved": "5", "unsolved": "3", "blank": "4"})
    return generations, prompts, star.critique_generations(generations, prompts)


def test_select_for_refinement_takes_unsolved_prompts_and_a_probe():
    generations, _, critiques = _star_round()
    selected = refine.select_for_refinement(generations, critiques, max_rows=10, probe_rows=5)
    rows = {(r["generation_id"], r["probe"]) for r in selected.iter_rows(named=True)}
    # First rejected sample of each unsolved prompt; the accepted sample as the probe.
    assert rows == {("unsolved-0", False), ("blank-0", False), ("solved-0", True)}
    capped = refine.select_for_refinement(generations, critiques, max_rows=1, probe_rows=0)
    assert capped.height == 1


def test_critic_feedback_never_gives_the_reference_away():
    _, _, critiques = _star_round()
    wrong = critiques.filter(pl.col("generation_id") == "unsolved-0").row(0, named=True)
    blank = critiques.filter(pl.col("generation_id") == "blank-0").row(0, named=True)
    assert refine.critic_feedback(wrong) == "The answer 1 is wrong."
    assert refine.critic_feedback(blank) == "The reply does not state a final answer."


def _refinements(rows: list[tuple[str, str, bool, str]]) -> pl.DataFrame:
    """(parent generation id, prompt id, probe, refined completion) -> refinements rows."""
    return pl.DataFrame(
        [
            {
                "round": "round_000",
                "generation_id": f"r-{parent}",
                "parent_generation_id": parent,
                "prompt_id": prompt_id,
                "sample_index": 0,
                "prompt": f"question {prompt_id}",
                "original_completion": "x",
                "probe": probe,
                "feedback_source": "critic",
                "feedback": "The answer 1 is wrong.",
                "completion": text,
                "completion_tokens": 1,
                "finish_reason": "stop",
            }
            for parent, prompt_id, probe, text in rows
        ],
        schema=refine.REFINEMENT_SCHEMA,
    )


def test_refinement_bookkeeping_repaired_and_broken():
    refinements = _refinements(
        [
            ("unsolved-0", "unsolved", False, "3"),  # repaired
            ("blank-0", "blank", False, "still no idea"),  # still rejected
            ("solved-0", "solved", True, "7"),  # probe: a right answer broken
        ]
    )
    references = {"solved": "5", "unsolved": "3", "blank": "4"}
    frame = refine.critique_refinements(refinements, references, references)
    assert frame["critic"].unique().to_list() == ["refiner"]
    assert frame["reason"].to_list() == ["repaired", "still_rejected", "broken"]
    assert frame["critique"][0] == "The answer 1 is wrong."
    stats = refine.refinement_stats(frame)
    assert stats == {
        "refined": 2,
        "repaired": 1,
        "repair_rate": 0.5,
        "probed": 1,
        "broken": 1,
        "broken_rate": 1.0,
    }


def test_refined_answers_are_judged_by_the_pseudo_label_not_the_reference():
    refinements = _refinements([("p-0", "p", False, "7")])
    frame = refine.critique_refinements(refinements, labels={"p": "7"}, references={"p": "8"})
    assert frame["verdict"][0] == "accept"  # agrees with the pseudo-label...
    assert frame["correct"][0] is False  # ...which ground truth says is wrong


def test_filter_prefers_sampled_answers_over_refined_ones():
    generations, prompts, critiques = _star_round()
    refinements = _refinements(
        [("unsolved-0", "unsolved", False, "3"), ("solved-0", "solved", True, "5.0")]
    )
    refined = refine.critique_refinements(
        refinements, methods._references(prompts), methods._references(prompts)
    )
    kept = star.filter_accepted(
        generations, pl.concat([critiques, refined], how="diagonal_relaxed"), 1, refinements
    )
    by_prompt = {r["prompt_id"]: (r["completion"], r["source"]) for r in kept.iter_rows(named=True)}
    assert by_prompt == {"solved": ("5", "generated"), "unsolved": ("3", "refined")}


def test_method_metrics_have_every_column_for_every_method():
    generations, prompts, critiques = _star_round()
    voted = consistency.critique_by_majority(generations, prompts, 0.5)
    for name, frame in (
        ("star", critiques),
        ("self_consistency", voted),
        ("self_refine", critiques),
    ):
        metrics = methods.method_metrics(methods.parse_method(name), frame)
        assert set(metrics) == {"method", *METRIC_COLUMNS}
        assert metrics["method"] == methods.parse_method(name).name


def test_templates_render_and_unknown_names_fail_clearly():
    text = render(load_template("refine.txt"), question="Q?", answer="1", feedback="wrong")
    assert text.startswith("Q?") and "Feedback: wrong" in text
    with pytest.raises(SelfImproveError, match="needs values"):
        render("{a} {b}", a="1")
    with pytest.raises(SelfImproveError, match="No prompt template"):
        load_template("missing.txt")


class _JudgeEngine:
    """Test-only judge: replies per answer text, cycling through a script."""

    model_ref = "scripted-judge"

    def __init__(self, replies: dict[str, list[str]]) -> None:
        self.replies, self.calls = replies, []

    def generate(self, prompts, n, sampling, log=None, response_prefix=""):
        from selfimprove_dagster.engines.base import Completion

        self.calls.append((len(prompts), n, response_prefix))
        out = []
        for i, prompt in enumerate(prompts):
            answer = prompt.split("Response: ")[1].split("\n")[0]
            for s in range(n):
                out.append(Completion(i, s, self.replies[answer][s], 10, 2, "stop"))
        return out


def test_critique_by_judge_averages_samples_and_judges_each_answer_once():
    generations = _generations({"p1": ["5", "5", "6", "huh"]})
    engine = _JudgeEngine(
        {"5": [" 5", " 4", " 5."], "6": [" 2", " banana", " 1"], "huh": ["?"] * 3}
    )
    from selfimprove_dagster.engines.base import Sampling

    frame = judge.critique_by_judge(
        engine, generations, _prompts({"p1": "5"}), Sampling(), 3, accept_points=4.0
    )
    assert engine.calls == [(3, 3, "Score:")]  # 3 distinct answers, 3 judgements each
    assert frame["judge_points"].to_list()[:3] == pytest.approx([14 / 3, 14 / 3, 1.5])
    assert frame["judge_points"][3] is None and frame["reason"][3] == "unparseable"
    assert frame["verdict"].to_list() == ["accept", "accept", "reject", "reject"]
    assert frame["judge_parsed"].to_list() == [3, 3, 2, 0]
    assert frame["critique"][2] == "Score: 2 | Score: banana | Score: 1"
    assert frame["correct"].to_list() == [True, True, False, False]
