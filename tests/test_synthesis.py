"""Self-Instruct synthesis: ROUGE-L, the filters, the ensemble, provenance bookkeeping.

A scripted engine (test-only fake) plays the policy, so every drop reason is planted
on purpose and the lineage of each kept prompt is known."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from selfimprove_dagster.engines.base import Completion, GenerationEngine
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.quality.gates import gate_no_contamination
from selfimprove_dagster.sources import rouge
from selfimprove_dagster.sources import synthesis as syn
from selfimprove_dagster.sources.tasks import make_task
from tests.conftest import SHARED_DATA

SEED_FILE = SHARED_DATA / "self_instruct" / "seed_tasks.jsonl"

# --- ROUGE-L ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # LCS 5 of 6 tokens each: P = R = 5/6.
        ("Write a poem about the sea.", "Write a poem about the ocean", 5 / 6),
        # Case and punctuation do not count.
        ("Sort these numbers!", "sort these numbers", 1.0),
        # LCS "the cat" (2) of 3 and 4 tokens: P = 2/3, R = 2/4, F = 4/7.
        ("the cat sat", "the big cat ran", 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)),
        # Order matters: LCS of "a b c" and "c b a" is 1.
        ("a b c", "c b a", 1 / 3),
        ("completely different words", "nothing in common here", 0.0),
        ("", "anything", 0.0),
    ],
)
def test_rouge_l_known_pairs(a, b, expected):
    assert rouge.rouge_l(a, b) == pytest.approx(expected)
    assert rouge.rouge_l(b, a) == pytest.approx(expected)  # F-measure is symmetric


def test_rouge_l_dedup_threshold_on_known_pairs():
    # Self-Instruct drops a candidate whose ROUGE-L with a kept instruction is > 0.7.
    kept = "Give me a list of five fruits that are rich in vitamin C."
    near = "Give me a list of five vegetables that are rich in vitamin C."  # one word swapped
    far = "Translate the following sentence into French."
    assert rouge.rouge_l(near, kept) > 0.7
    assert rouge.rouge_l(far, kept) < 0.7
    score, where = rouge.most_similar(near, [far, kept])
    assert where == 1 and score > 0.7


def test_lcs_length():
    assert rouge.lcs_length(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == 3
    assert rouge.lcs_length([], ["a"]) == 0


def test_consensus_picks_the_sample_the_others_agree_with():
    best, agreement, means = rouge.consensus(["42", "42", "41", "42"])
    assert best == 0 and agreement == pytest.approx(2 / 3)  # two of the three others agree
    assert means[2] == 0.0
    assert rouge.consensus([]) == (None, 0.0, [])
    assert rouge.consensus(["only one"])[1] == 0.0  # no agreement to measure


# --- parsing and filters -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Task 5: Count the vowels in 'banana'.", "Count the vowels in 'banana'."),
        ('"How many legs do 3 spiders have?"', "How many legs do 3 spiders have?"),
        ("How many days are in 2 weeks?\nTask 6: something else", "How many days are in 2 weeks?"),
        ("Add 4 and 9. Answer with just the number.", "Add 4 and 9."),
        ("First paragraph.\n\nSecond paragraph.", "First paragraph."),
        ("   ", None),
        ("Task 5: 12345", None),  # no words: not a task
    ],
)
def test_parse_instruction(reply, expected):
    assert syn.parse_instruction(reply) == expected


def test_text_filter_reasons():
    config = syn.SynthesisConfig(n=1, min_words=3, max_words=10)
    assert syn.text_filter("Add two", config) == (syn.TOO_SHORT, "2 words < 3")
    assert syn.text_filter(" ".join(["word"] * 11), config)[0] == syn.TOO_LONG
    assert syn.text_filter("Draw a picture of a cat", config) == (syn.BLACKLISTED, "picture")
    assert syn.text_filter("Please go to the store and count", config) == (syn.BLACKLISTED, "go to")
    assert syn.text_filter("How many apples are left?", config) is None
    # Whole words only: "mapping" is not "map", "profile" is not "file".
    assert syn.blacklisted_word("Describe the mapping of a profile") is None


def test_load_seed_tasks_reads_the_real_seed_file():
    seeds = syn.load_seed_tasks(SEED_FILE)
    assert len(seeds) == 175
    assert seeds[0].id == "seed_task_0" and seeds[0].instruction
    with_input = next(s for s in seeds if s.input)
    assert with_input.text == f"{with_input.instruction}\n{with_input.input}"


def test_load_seed_tasks_missing_file(tmp_path):
    with pytest.raises(SelfImproveError, match="does not exist"):
        syn.load_seed_tasks(tmp_path / "nope.jsonl")


# --- the loop, with a scripted policy --------------------------------------------------


class ScriptedSynthEngine(GenerationEngine):
    """Test-only policy: replies to task requests from `tasks` in order; answers a
    synthesized prompt with `answers[prompt]` (a list, one per sample) or "7"."""

    def __init__(self, tasks: list[str], answers: dict[str, list[str]] | None = None):
        self.model_ref, self.tasks, self.answers = "scripted", list(tasks), answers or {}
        self.requests: list[str] = []
        self.last_stats: dict = {}

    def generate(self, prompts, n, sampling, log=None):
        out = []
        for i, prompt in enumerate(prompts):
            if prompt.startswith("Here are some tasks"):
                self.requests.append(prompt)
                out.append(Completion(i, 0, self.tasks.pop(0), 50, 10, "stop"))
                continue
            replies = self.answers.get(prompt, ["7"] * n)
            out += [Completion(i, s, replies[s], 20, 2, "stop") for s in range(n)]
        return out


SEEDS = [
    syn.SeedTask("seed_a", "Give me a list of five fruits that are rich in vitamin C."),
    syn.SeedTask("seed_b", "Translate the sentence into French.", "I like cheese."),
]


def _prompt(instruction: str) -> str:
    return syn.answer_prompt(instruction)


def test_synthesize_records_every_drop_reason_and_keeps_the_rest():
    eval_set = make_task("addition_2digit", n_train=0, n_eval=20, seed=0)
    eval_question = eval_set["prompt"][0].replace(" Answer with just the number.", "")
    tasks = [
        "Task 3: How many legs do 4 dogs have in total?",  # kept (answer 16)
        "   ",  # unparseable
        "Add two",  # too short
        "Draw a picture of 3 cats and count their ears.",  # blacklisted
        "Give me a list of five vegetables that are rich in vitamin C.",  # near-dup of seed_a
        "How many legs do 4 dogs have in all?",  # near-dup of the first, kept one
        eval_question,  # a synthesized duplicate of a held-out prompt
        "How many minutes are in 3 hours?",  # samples disagree
        "Name a colour that you like a lot.",  # consensus is not a number
        "How many wheels do 5 bicycles have?",  # kept (answer 10)
    ]
    answers = {
        _prompt("How many legs do 4 dogs have in total?"): ["16", "16", "16", "15"],
        _prompt("How many minutes are in 3 hours?"): ["180", "120", "200", "90"],
        _prompt("Name a colour that you like a lot."): ["Blue", "Blue", "blue", "Red"],
        _prompt("How many wheels do 5 bicycles have?"): ["10", "10", "10", "10"],
    }
    engine = ScriptedSynthEngine(tasks, answers)
    config = syn.SynthesisConfig(n=5, oversample=2.0, max_passes=1, ensemble_samples=4)
    out = syn.synthesize(engine, SEEDS, [], eval_set, config, "round_000")

    assert out.height == 10
    reasons = out["drop_reason"].to_list()
    assert reasons == [
        None,
        syn.UNPARSEABLE,
        syn.TOO_SHORT,
        syn.BLACKLISTED,
        syn.NEAR_DUPLICATE,
        syn.NEAR_DUPLICATE,
        syn.EVAL_OVERLAP,
        syn.LOW_AGREEMENT,
        syn.NOT_NUMERIC,
        None,
    ]
    kept = out.filter(pl.col("kept"))
    assert kept["answer"].to_list() == ["16", "10"]
    assert kept["agreement"].to_list() == [pytest.approx(2 / 3, abs=1e-4), 1.0]
    assert (
        out["drop_detail"][4]
        == f"ROUGE-L {rouge.rouge_l(tasks[4], SEEDS[0].instruction):.2f} with seed_a"
    )
    assert out["drop_detail"][5].endswith(kept["prompt_id"][0])  # similar to the kept one
    assert out["drop_detail"][6] == eval_set["prompt"][0]
    assert syn.dedup_rate(out) == pytest.approx(2 / 7)  # 7 candidates reached the filter
    counts = syn.drop_counts(out)
    assert counts[syn.NEAR_DUPLICATE] == 2 and counts[syn.UNPARSEABLE] == 1
    assert sum(counts.values()) == 8


def test_contamination_gate_flags_a_synthesized_duplicate_of_an_eval_prompt():
    # Were a synthesized duplicate to slip into the train split, the prompts gate stops it.
    eval_set = make_task("addition_2digit", n_train=0, n_eval=20, seed=0)
    copied = eval_set["prompt"][3].replace("What is", "what is ")  # re-spaced copy
    train = pl.DataFrame({"prompt": [copied, "How many wheels do 5 bicycles have?"]})
    gate = gate_no_contamination(train, eval_set)
    assert not gate.passed and gate.observed == 1
    assert gate.details["contaminated_prompts"][0]["eval_prompt"] == eval_set["prompt"][3]


def test_provenance_seeds_and_earlier_prompts_are_recorded():
    earlier = [
        syn.PoolPrompt("p_old_1", "How many sides do 2 squares have?", "round_000"),
        syn.PoolPrompt("p_old_2", "What is the number of toes on 3 feet?", "round_000"),
    ]
    tasks = [
        "How many legs do 4 dogs have in total?",
        "How many eyes do 6 owls have?",
        "How many months are in 5 years?",
        "How many corners do 7 triangles have?",
    ]
    engine = ScriptedSynthEngine(tasks)
    config = syn.SynthesisConfig(
        n=4, oversample=1.0, max_passes=2, seeds_per_prompt=2, synthesized_per_prompt=2
    )
    # Pass 0 asks for 4 but two are planted duplicates -> pass 1 asks for the missing 2.
    engine.tasks = [tasks[0], tasks[1], "How many legs do 4 dogs have in total?", tasks[0]]
    engine.tasks += [tasks[2], tasks[3]]
    out = syn.synthesize(engine, SEEDS, earlier, pl.DataFrame({"prompt": []}), config, "round_001")

    assert out.filter(pl.col("kept")).height == 4
    for row in out.iter_rows(named=True):
        assert sorted(row["seed_ids"]) == ["seed_a", "seed_b"]  # both seeds, every request
        assert len(row["parent_prompt_ids"]) == 2
    first_pass = out.filter(pl.col("pass_index") == 0)
    for parents in first_pass["parent_prompt_ids"]:  # pass 0 only knows earlier rounds
        assert set(parents) == {"p_old_1", "p_old_2"}
    pool_ids = {"p_old_1", "p_old_2", *first_pass.filter(pl.col("kept"))["prompt_id"]}
    for parents in out.filter(pl.col("pass_index") == 1)["parent_prompt_ids"]:
        assert set(parents) <= pool_ids
    # What the policy saw is what was recorded: each request quotes its parents' text.
    texts = {p.prompt_id: p.instruction for p in earlier}
    texts |= dict(out.filter(pl.col("kept")).select("prompt_id", "instruction").iter_rows())
    for request, parents in zip(engine.requests, out["parent_prompt_ids"], strict=True):
        assert all(texts[pid] in request for pid in parents)


def test_candidates_table_round_trips_through_parquet(tmp_path: Path):
    engine = ScriptedSynthEngine(["How many eyes do 6 owls have?"])
    out = syn.synthesize(
        engine,
        SEEDS,
        [],
        pl.DataFrame({"prompt": []}),
        syn.SynthesisConfig(n=1, oversample=1.0),
        "round_000",
    )
    out.write_parquet(tmp_path / "c.parquet")
    back = pl.read_parquet(tmp_path / "c.parquet")
    assert back.schema == out.schema and back["seed_ids"].to_list() == out["seed_ids"].to_list()
    assert json.dumps(syn.drop_counts(back))  # JSON-able for metadata


def test_synthesis_refuses_a_round_scored_on_another_task_type():
    # Planted: the held-out set is multiple choice; synthesized numeric prompts would
    # train another task. Refused before the policy writes anything.
    eval_set = pl.DataFrame(
        {"prompt": ["Where are books kept?"], "verifier": ["multiple_choice"]},
    )
    engine = ScriptedSynthEngine(["How many eyes do 6 owls have?"])
    with pytest.raises(SelfImproveError) as err:
        syn.synthesize(engine, SEEDS, [], eval_set, syn.SynthesisConfig(n=1), "round_000")
    assert "scored on multiple_choice rows" in str(err.value)
    assert "drop self_instruct from SELFIMPROVE_SOURCES" in str(err.value)
    assert engine.requests == []
    # A numeric (or unlabelled: null = numeric) held-out set is fine.
    syn.check_numeric_round(pl.DataFrame({"verifier": ["numeric", None]}))


def test_contamination_drops_are_candidate_rows_with_the_eval_prompt(tmp_path: Path):
    dropped = [
        {
            "prompt": "Q: What is 23 + 45?",
            "answer": "68",
            "eval_prompt": "What is 23 + 45?",
            "match": "near",
            "similarity": 0.93,
        }
    ]
    rows = syn.contamination_candidates("round_000", dropped)
    assert rows.schema == pl.Schema(syn.CANDIDATE_SCHEMA)
    row = rows.row(0, named=True)
    assert (row["source"], row["kept"], row["drop_reason"]) == ("dataset", False, "contaminated")
    assert row["eval_prompt"] == "What is 23 + 45?" and row["similarity"] == 0.93
    assert row["drop_detail"] == "near match (0.93)" and row["answer"] == "68"
    # They stack under a synthesis's candidates in one table; the pool ignores them.
    engine = ScriptedSynthEngine(["How many eyes do 6 owls have?"])
    synthesized = syn.synthesize(
        engine,
        SEEDS,
        [],
        pl.DataFrame({"prompt": []}),
        syn.SynthesisConfig(n=1, oversample=1.0),
        "round_000",
    )
    both = pl.concat([synthesized, rows])
    assert both["source"].to_list() == ["self_instruct", "dataset"]
    assert syn.drop_counts(both)["surplus"] == 0 and syn.dedup_rate(both) == 0.0
