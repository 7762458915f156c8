"""Self-Instruct synthesis: the round's policy writes new prompts from seed tasks.

Self-Instruct (Wang et al., 2023) grows a task pool from 175 human-written seed tasks:
the model sees a few seed tasks and a few earlier machine-written ones, writes a new
instruction, then instances for it; candidates that are near-duplicates of the pool
(ROUGE-L > 0.7), too short or too long, or mention things a text model cannot do
(images, files, ...) are dropped. Ensemble-Instruct (Lee et al., 2023) samples several
outputs per instruction and keeps the one the samples agree on (ROUGE-L consensus),
dropping instructions whose samples disagree.

Here, per pass:

1. request:    `seeds_per_prompt` seed tasks (of those up to `max_seed_chars` long:
               on CPU the prompt's prefill is the cost) + `synthesized_per_prompt`
               earlier synthesized prompts (earlier rounds' and this round's earlier
               passes) in a template (`templates/self_instruct_task.txt`); one sample
               each.
2. filter:     unparseable -> too short / too long -> blacklisted keyword ->
               near-duplicate of everything kept so far (all seeds + pool + this
               round's candidates that passed the text filters; one that later fails
               the ensemble still counts) -> overlap with a held-out eval prompt (the
               contamination gate's test).
3. instance:   `ensemble_samples` answers to the new prompt from the same policy; the
               consensus sample (highest mean ROUGE-L to the others) is the answer,
               dropped below `min_agreement`.

Why answers must be numbers: the round's critic is a numeric verifier. A synthesized
prompt has no ground truth, so its answer is the ensemble's consensus, marked
`answer_verified=False`: the verifier then checks each later sample's agreement with
that model-made label (a self-consistency pseudo-label). A free-text consensus gives
the verifier nothing to check, so such candidates are dropped with reason
`answer_not_numeric` (still listed, with their samples, in `prompt_candidates`). The
template asks for tasks with a numeric answer, and the ensemble compares the samples'
final numbers (ROUGE-L between one-number strings is exact match, so the consensus is
the majority answer and the agreement the share of other samples that give it).

Only numeric tasks are synthesized. A round whose held-out set is another task type
(multiple choice, math, code, custom verifier) is refused before anything is sampled
(`check_numeric_round`): a numeric synthesized prompt would train a different task
than the one the round is scored on, and synthesizing prompts of those types needs
what the consensus cannot give (option sets with one right label, tests for a
program). Mix self_instruct with numeric sources only (task, curriculum, a numeric
dataset).

Every candidate row records its provenance (`seed_ids`, `parent_prompt_ids`) and, when
dropped, the reason. `synthesize` returns all candidates; kept ones become prompts.
The same table also holds the dataset train rows dropped at load time as
contaminated (`contamination_candidates`: source `dataset`, drop reason
`contaminated`, the eval prompt each matched), so every prompt a source proposed and
the round did not use is one query away.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from selfimprove_dagster.engines.base import GenerationEngine, Sampling
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.ids import prompt_id
from selfimprove_dagster.progress import LogFn
from selfimprove_dagster.prompting import load_template, render
from selfimprove_dagster.sources import rouge
from selfimprove_dagster.verifiers.dispatch import verifier_name
from selfimprove_dagster.verifiers.numeric import extract_answer

# Self-Instruct's keyword filter: things a text-only model cannot see or produce.
BLACKLIST: tuple[str, ...] = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
    "map", "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart",
    "diagram",
)  # fmt: skip
TASK_TEMPLATE = "self_instruct_task.txt"
ANSWER_TEMPLATE = "self_instruct_answer.txt"

# Drop reasons, in the order the filters run.
UNPARSEABLE = "unparseable"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
BLACKLISTED = "blacklisted"
NEAR_DUPLICATE = "near_duplicate"
EVAL_OVERLAP = "eval_overlap"
LOW_AGREEMENT = "low_agreement"
NOT_NUMERIC = "answer_not_numeric"
# Not a synthesis filter: a dataset train row dropped at load time (`contamination_candidates`).
CONTAMINATED = "contaminated"
DROP_REASONS = (
    UNPARSEABLE, TOO_SHORT, TOO_LONG, BLACKLISTED, NEAR_DUPLICATE, EVAL_OVERLAP,
    LOW_AGREEMENT, NOT_NUMERIC,
)  # fmt: skip

CANDIDATE_SCHEMA: dict[str, pl.DataType] = {
    "round": pl.String(),
    "candidate_id": pl.String(),  # "<round>:<pass>:<request>"
    "pass_index": pl.Int64(),
    "raw_text": pl.String(),  # what the policy wrote
    "instruction": pl.String(),  # parsed from it (null: unparseable)
    "prompt": pl.String(),  # the train prompt it would become
    "prompt_id": pl.String(),
    "seed_ids": pl.List(pl.String()),  # seed tasks shown in context
    "parent_prompt_ids": pl.List(pl.String()),  # earlier synthesized prompts shown
    "kept": pl.Boolean(),
    "drop_reason": pl.String(),  # null when kept
    "drop_detail": pl.String(),  # the keyword, the similar text, the eval prompt, ...
    "max_rouge_l": pl.Float64(),  # against everything kept before it
    "samples": pl.List(pl.String()),  # the ensemble's answers
    "consensus_output": pl.String(),
    "agreement": pl.Float64(),  # mean ROUGE-L of the consensus sample to the others
    "answer": pl.String(),  # the consensus's number (the model-made label)
    "source": pl.String(),  # who proposed it: self_instruct, or dataset (contaminated rows)
    "eval_prompt": pl.String(),  # eval_overlap / contaminated: the held-out prompt matched
    "similarity": pl.Float64(),  # contaminated: similarity to that eval prompt (1.0: exact)
}


@dataclass(frozen=True)
class SeedTask:
    """One human-written seed task (Self-Instruct's `seed_tasks.jsonl` format)."""

    id: str
    instruction: str
    input: str = ""
    output: str = ""

    @property
    def text(self) -> str:
        """The task as a self-contained request: instruction, then its first input."""
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction


@dataclass(frozen=True)
class PoolPrompt:
    """A synthesized prompt kept earlier (an earlier round's, or this round's)."""

    prompt_id: str
    instruction: str
    origin_round: str


@dataclass(frozen=True)
class SynthesisConfig:
    """Knobs of one round's synthesis (defaults: a small CPU-friendly run)."""

    n: int  # synthesized prompts wanted this round
    seeds_per_prompt: int = 4  # seed tasks shown per request (the paper: 6)
    max_seed_chars: int = 200  # longer seed tasks are not shown (prefill cost on CPU)
    synthesized_per_prompt: int = 2  # earlier synthesized prompts shown (the paper: 2)
    oversample: float = 3.0  # requests per still-missing prompt, per pass
    max_passes: int = 3  # passes; later ones see earlier passes' prompts in context
    ensemble_samples: int = 4  # answers sampled per new prompt (Ensemble-Instruct)
    min_agreement: float = 0.5  # least consensus agreement kept
    dedup_threshold: float = 0.7  # ROUGE-L above which a candidate is a near-duplicate
    min_words: int = 3  # shortest instruction kept (words)
    max_words: int = 60  # longest instruction kept (words; the paper: 150)
    blacklist: tuple[str, ...] = BLACKLIST
    contamination_threshold: float = 0.9  # near-duplicate ratio vs held-out prompts
    task_sampling: Sampling = field(
        default_factory=lambda: Sampling(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=64)
    )
    answer_sampling: Sampling = field(
        default_factory=lambda: Sampling(temperature=0.7, top_k=50, max_new_tokens=16)
    )
    seed: int = 0


def load_seed_tasks(path: str | Path) -> list[SeedTask]:
    """Seed tasks from a Self-Instruct `seed_tasks.jsonl` (id, instruction, instances)."""
    path = Path(path)
    if not path.is_file():
        raise SelfImproveError(
            f"seed task file {path} does not exist",
            "point SELFIMPROVE_SEED_TASKS_PATH at Self-Instruct's seed_tasks.jsonl "
            "(relative paths resolve from the working directory)",
        )
    seeds = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                instance = (record.get("instances") or [{}])[0]
                seeds.append(
                    SeedTask(
                        id=str(record.get("id", f"seed_{line_number}")),
                        instruction=record["instruction"].strip(),
                        input=(instance.get("input") or "").strip(),
                        output=(instance.get("output") or "").strip(),
                    )
                )
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
                raise SelfImproveError(
                    f"line {line_number} of {path} is not a seed task ({err!r})",
                    'write one JSON object per line with "instruction" and "instances"',
                ) from err
    if not seeds:
        raise SelfImproveError(f"seed task file {path} is empty", "add seed tasks")
    return seeds


# --- pure steps ------------------------------------------------------------------------

_TASK_PREFIX = re.compile(r"^\s*(?:new\s+)?(?:task|instruction)\s*\d*\s*[:.)-]\s*", re.IGNORECASE)
_NEXT_TASK = re.compile(r"\n\s*(?:task|instruction)\s*\d+\s*[:.)]", re.IGNORECASE)
_ANSWER_SUFFIX = re.compile(r"\s*answer with just the number\.?\s*$", re.IGNORECASE)


def parse_instruction(text: str) -> str | None:
    """The new task in the policy's reply, or None when there is none.

    Strips a leading "Task 5:" label and quotes, stops at the next "Task N:" (the model
    continuing the list) or a blank line, drops a trailing "Answer with just the
    number." (the answer template adds it back).
    """
    text = _NEXT_TASK.split(text.strip(), maxsplit=1)[0]
    text = text.split("\n\n", 1)[0]
    text = _TASK_PREFIX.sub("", text).strip().strip("\"'`").strip()
    text = _ANSWER_SUFFIX.sub("", text).strip()
    return text if any(ch.isalpha() for ch in text) else None


def blacklisted_word(text: str, words: Sequence[str] = BLACKLIST) -> str | None:
    """The first blacklisted keyword in `text` (whole words, any case), or None."""
    lowered = " ".join(rouge.tokenize(text))
    for word in words:
        if re.search(rf"\b{re.escape(word.lower())}\b", lowered):
            return word
    return None


def text_filter(instruction: str, config: SynthesisConfig) -> tuple[str, str] | None:
    """(drop reason, detail) of the length and keyword filters, or None when it passes."""
    words = len(instruction.split())
    if words < config.min_words:
        return TOO_SHORT, f"{words} words < {config.min_words}"
    if words > config.max_words:
        return TOO_LONG, f"{words} words > {config.max_words}"
    word = blacklisted_word(instruction, config.blacklist)
    if word is not None:
        return BLACKLISTED, word
    return None


def request_prompt(examples: Sequence[str]) -> str:
    """The in-context request: numbered example tasks in the task template."""
    listed = "\n".join(f"Task {i}: {text}" for i, text in enumerate(examples, start=1))
    return render(load_template(TASK_TEMPLATE), examples=listed)


def answer_prompt(instruction: str) -> str:
    """The train prompt a synthesized instruction becomes (asks for a bare number)."""
    return render(load_template(ANSWER_TEMPLATE), instruction=instruction.strip())


def ensemble_answer(samples: Sequence[str]) -> tuple[str | None, float, str | None]:
    """(consensus sample, agreement, its number) over an instruction's answer samples.

    Samples are compared by their final numbers (`extract_answer`; the whole text when
    a sample has none), with `rouge.consensus`."""
    comparable = [extract_answer(s) or s for s in samples]
    best, agreement, _ = rouge.consensus(comparable)
    if best is None:
        return None, 0.0, None
    return samples[best], agreement, extract_answer(samples[best])


class DedupIndex:
    """Everything kept so far, for the ROUGE-L near-duplicate filter (tokens cached)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.tokens: list[list[str]] = []

    def add(self, item_id: str, text: str) -> None:
        self.ids.append(item_id)
        self.tokens.append(rouge.tokenize(text))

    def most_similar(self, text: str) -> tuple[float, str | None]:
        tokens = rouge.tokenize(text)
        best, where = 0.0, None
        for item_id, other in zip(self.ids, self.tokens, strict=True):
            score = rouge.rouge_l(tokens, other)
            if score > best:
                best, where = score, item_id
        return best, where


# --- the synthesis loop ----------------------------------------------------------------


def synthesize(
    engine: GenerationEngine,
    seeds: Sequence[SeedTask],
    pool: Sequence[PoolPrompt],
    eval_prompts: pl.DataFrame,
    config: SynthesisConfig,
    round_: str,
    log: LogFn | None = None,
) -> pl.DataFrame:
    """Candidates of one round's synthesis, kept and dropped (`CANDIDATE_SCHEMA`).
    A non-numeric held-out set is refused first (`check_numeric_round`)."""
    from selfimprove_dagster.quality.gates import gate_no_contamination

    check_numeric_round(eval_prompts)
    say = log or (lambda _: None)
    rng = random.Random(f"self_instruct:{round_}:{config.seed}")
    index = DedupIndex()
    for seed in seeds:
        index.add(seed.id, seed.instruction)
    in_context = list(pool)  # earlier synthesized prompts, growing as we keep more
    for item in pool:
        index.add(item.prompt_id, item.instruction)
    rows: list[dict] = []
    kept = 0
    for pass_index in range(config.max_passes):
        missing = config.n - kept
        if missing <= 0:
            break
        requests = [
            _request(rng, seeds, in_context, config)
            for _ in range(math.ceil(missing * config.oversample))
        ]
        say(f"self-instruct pass {pass_index}: {len(requests)} requests for {missing} prompts")
        replies = engine.generate(
            [request_prompt(r["examples"]) for r in requests], 1, config.task_sampling, log=log
        )
        passing: list[dict] = []
        for request, reply in zip(requests, replies, strict=True):
            row = _candidate(round_, pass_index, len(rows) + len(passing), request, reply.text)
            _filter(row, index, eval_prompts, config, gate_no_contamination)
            if row["drop_reason"] is None:
                index.add(row["prompt_id"], row["instruction"])  # dedup within the pass too
            passing.append(row)
        survivors = [r for r in passing if r["drop_reason"] is None]
        if survivors:
            answers = engine.generate(
                [r["prompt"] for r in survivors],
                config.ensemble_samples,
                config.answer_sampling,
                log=log,
            )
            for row, start in zip(
                survivors, range(0, len(answers), config.ensemble_samples), strict=True
            ):
                samples = [c.text for c in answers[start : start + config.ensemble_samples]]
                _judge_ensemble(row, samples, config)
        for row in passing:
            if row["drop_reason"] is None and kept < config.n:
                row["kept"] = True
                kept += 1
                in_context.append(PoolPrompt(row["prompt_id"], row["instruction"], round_))
            elif row["drop_reason"] is None:  # passed everything, but the round is full
                row["drop_reason"], row["drop_detail"] = "surplus", f"{config.n} already kept"
        rows += passing
        say(f"self-instruct pass {pass_index}: kept {kept}/{config.n} so far")
    return pl.DataFrame(rows, schema=CANDIDATE_SCHEMA)


def _request(
    rng: random.Random,
    seeds: Sequence[SeedTask],
    pool: Sequence[PoolPrompt],
    config: SynthesisConfig,
) -> dict:
    short = [s for s in seeds if len(s.text) <= config.max_seed_chars] or list(seeds)
    chosen_seeds = rng.sample(short, min(config.seeds_per_prompt, len(short)))
    chosen_pool = rng.sample(list(pool), min(config.synthesized_per_prompt, len(pool)))
    examples = [s.text for s in chosen_seeds] + [p.instruction for p in chosen_pool]
    return {
        "examples": examples,
        "seed_ids": [s.id for s in chosen_seeds],
        "parent_prompt_ids": [p.prompt_id for p in chosen_pool],
    }


def _candidate(round_: str, pass_index: int, number: int, request: dict, text: str) -> dict:
    instruction = parse_instruction(text)
    prompt = answer_prompt(instruction) if instruction else None
    return {
        "round": round_,
        "candidate_id": f"{round_}:{pass_index}:{number}",
        "pass_index": pass_index,
        "raw_text": text,
        "instruction": instruction,
        "prompt": prompt,
        "prompt_id": prompt_id(prompt) if prompt else None,
        "seed_ids": request["seed_ids"],
        "parent_prompt_ids": request["parent_prompt_ids"],
        "kept": False,
        "drop_reason": None if instruction else UNPARSEABLE,
        "drop_detail": None,
        "max_rouge_l": None,
        "samples": [],
        "consensus_output": None,
        "agreement": None,
        "answer": None,
        "source": "self_instruct",
        "eval_prompt": None,
        "similarity": None,
    }


def check_numeric_round(eval_prompts: pl.DataFrame) -> None:
    """A SelfImproveError when the round's held-out rows are not numeric: Self-Instruct
    here writes numeric tasks only (see the module docstring)."""
    if "verifier" not in eval_prompts.columns:
        return
    kinds = sorted(
        {verifier_name({"verifier": v}) for v in eval_prompts["verifier"].to_list()} - {"numeric"}
    )
    if kinds:
        raise SelfImproveError(
            f"self_instruct synthesizes numeric tasks, but this round is scored on "
            f"{', '.join(kinds)} rows: the synthesized prompts would train another task "
            "than the held-out set measures",
            "drop self_instruct from SELFIMPROVE_SOURCES for this dataset, or use it with "
            "numeric sources only (task, curriculum, or a dataset with numeric answers)",
        )


def contamination_candidates(round_: str, dropped: Sequence[dict]) -> pl.DataFrame:
    """Dataset train rows dropped at load time as contaminated (`tasks.load_dataset_file(
    ..., drop_contaminated=True, dropped=[...])`) as `prompt_candidates` rows: source
    `dataset`, kept False, drop_reason `contaminated`, drop_detail the match ("near
    match (0.95)"), eval_prompt and similarity of the held-out prompt each matched."""
    rows = [
        {
            "round": round_,
            "candidate_id": f"{round_}:dataset:{i}",
            "raw_text": d["prompt"],
            "prompt": d["prompt"],
            "prompt_id": prompt_id(d["prompt"]),
            "seed_ids": [],
            "parent_prompt_ids": [],
            "kept": False,
            "drop_reason": CONTAMINATED,
            "drop_detail": f"{d.get('match', 'near')} match ({d.get('similarity')})",
            "samples": [],
            "answer": None if d.get("answer") is None else str(d["answer"]),
            "source": "dataset",
            "eval_prompt": d["eval_prompt"],
            "similarity": d.get("similarity"),
        }
        for i, d in enumerate(dropped)
    ]
    return pl.DataFrame(rows, schema=CANDIDATE_SCHEMA)


def _filter(row: dict, index: DedupIndex, eval_prompts, config, gate) -> None:
    """Sets drop_reason / drop_detail / max_rouge_l of a parsed candidate in place."""
    if row["drop_reason"] is not None:
        return
    failed = text_filter(row["instruction"], config)
    if failed is not None:
        row["drop_reason"], row["drop_detail"] = failed
        return
    similarity, similar_to = index.most_similar(row["instruction"])
    row["max_rouge_l"] = round(similarity, 4)
    if similarity > config.dedup_threshold:
        row["drop_reason"] = NEAR_DUPLICATE
        row["drop_detail"] = f"ROUGE-L {similarity:.2f} with {similar_to}"
        return
    if eval_prompts.height:
        result = gate(
            pl.DataFrame({"prompt": [row["prompt"]]}), eval_prompts, config.contamination_threshold
        )
        if not result.passed:
            match = result.details["contaminated_prompts"][0]
            row["drop_reason"] = EVAL_OVERLAP
            row["drop_detail"] = row["eval_prompt"] = match["eval_prompt"]
            row["similarity"] = match.get("similarity")


def _judge_ensemble(row: dict, samples: list[str], config: SynthesisConfig) -> None:
    output, agreement, answer = ensemble_answer(samples)
    row.update(samples=samples, consensus_output=output, agreement=round(agreement, 4))
    if agreement < config.min_agreement:
        row["drop_reason"] = LOW_AGREEMENT
        row["drop_detail"] = f"agreement {agreement:.2f} < {config.min_agreement}"
    elif answer is None:
        row["drop_reason"], row["drop_detail"] = NOT_NUMERIC, "consensus has no number"
    else:
        row["answer"] = answer


def dedup_rate(candidates: pl.DataFrame) -> float:
    """Near-duplicates among the candidates that reached the ROUGE-L filter."""
    reached = candidates.filter(pl.col("max_rouge_l").is_not_null())
    if reached.height == 0:
        return 0.0
    return reached.filter(pl.col("drop_reason") == NEAR_DUPLICATE).height / reached.height


def drop_counts(candidates: pl.DataFrame) -> dict[str, int]:
    """Dropped candidates per reason (every reason listed, zeros included)."""
    found = dict(candidates.filter(~pl.col("kept")).group_by("drop_reason").len().iter_rows())
    return {reason: int(found.get(reason, 0)) for reason in (*DROP_REASONS, "surplus")}
