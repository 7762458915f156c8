"""The STaR / ReST-EM steps of a round as functions on Polars frames.

    prompts ─ sample k per train prompt ─> generations ─ verifier ─> critiques
            ─ keep accepted, dedupe, cap per prompt ─> filtered ─ LoRA SFT ─> checkpoint
                         (rationalization: unsolved prompts ─ hint ─> rationalized rows)

The verifier is chosen per prompt row (`verifiers.dispatch`: numeric, multiple_choice,
math, code, custom). Numeric and multiple-choice rows are judged by vectorized Polars
expressions; code rows run in the sandbox in parallel.

Each function takes and returns plain frames, so it is tested without Dagster or a
model; the assets in `assets/rounds.py` call them in that order.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import polars as pl

from selfimprove_dagster.engines.base import Completion, GenerationEngine, Sampling
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.ids import content_hash, generation_id
from selfimprove_dagster.progress import LogFn
from selfimprove_dagster.verifiers.dispatch import verify_rows
from selfimprove_dagster.verifiers.verdict import Verdict

# Prompt columns a verifier may read (`sources.tasks.VERIFIER_COLUMNS`).
VERIFIER_COLUMNS = ("verifier", "choices", "tests", "test_setup", "entry_point")

# A round with at least this many generations is judged in slices, one per Polars thread
# (`critique_generations`); a smaller one takes well under a second in one piece.
PARALLEL_MIN_ROWS = 50_000

# The critique of a rationale cut off by the token limit before its final answer.
CUT_OFF_WORDS = "cut off at the token limit before a final answer"


def train_prompts(prompts: pl.DataFrame) -> pl.DataFrame:
    return prompts.filter(pl.col("split") == "train")


def eval_prompts(prompts: pl.DataFrame) -> pl.DataFrame:
    return prompts.filter(pl.col("split") == "eval")


def sample_generations(
    engine: GenerationEngine,
    prompts: pl.DataFrame,
    round_: str,
    n: int,
    sampling: Sampling,
    log: LogFn | None = None,
) -> pl.DataFrame:
    """k samples per train prompt from the round's policy, one row per sample."""
    train = train_prompts(prompts)
    completions = engine.generate(train["prompt"].to_list(), n, sampling, log=log)
    return generations_frame(round_, train, completions, engine.model_ref, sampling)


def generations_frame(
    round_: str,
    prompts: pl.DataFrame,
    completions: list[Completion],
    policy: str,
    sampling: Sampling,
) -> pl.DataFrame:
    """Rows: round, generation_id, prompt_id, sample_index, prompt, completion, token
    counts, finish_reason, and the policy + sampling settings that produced them."""
    prompt_ids = prompts["prompt_id"].to_list()
    texts = prompts["prompt"].to_list()
    rows = [
        {
            "round": round_,
            "generation_id": generation_id(round_, prompt_ids[c.prompt_index], c.sample_index),
            "prompt_id": prompt_ids[c.prompt_index],
            "sample_index": c.sample_index,
            "prompt": texts[c.prompt_index],
            "completion": c.text,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "finish_reason": c.finish_reason,
            "policy": policy,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "max_new_tokens": sampling.max_new_tokens,
            "seed": sampling.seed,
        }
        for c in completions
    ]
    return pl.DataFrame(rows, schema_overrides={"temperature": pl.Float64, "top_p": pl.Float64})


def critique_generations(
    generations: pl.DataFrame, prompts: pl.DataFrame, answer_format: str = "short"
) -> pl.DataFrame:
    """The verifier's verdict on every generation.

    Rows: round, generation_id, prompt_id, critic, verdict (accept/reject), correct,
    extracted_answer, reference_answer, reason, score, critique (the verdict in words).

    Rows are grouped by verifier: numeric and multiple-choice groups are judged as
    whole frames (`verify_frame`, Polars expressions), the others through
    `verifiers.dispatch.verify_rows` (the code sandbox runs in parallel). What depends
    only on the prompt (the canonical reference number, the choices and the correct
    label) is worked out once per prompt, before the join with the generations.

    `answer_format` is the round's (`sources.answer_format`): with `rationale` the
    prompt asks for reasoning and a final "Answer: X" line, so a generation that
    stopped at the token limit (finish_reason "length") and states no final answer is
    rejected with reason `cut_off` instead of being read by the verifier's last-resort
    fallback (`cut_off_rows`).
    """
    answers, choices = _prompt_answers(prompts)
    kinds = set(answers["_kind"].unique().to_list())
    if kinds == {"numeric"}:  # one verifier (a generation without a prompt row is numeric)
        answers = answers.select("prompt_id", "answer", "_reference")
    rows = _joined(generations, answers)
    if answer_format == "rationale" and "finish_reason" in generations.columns:
        rows = rows.with_columns(cut_off=cut_off_rows(generations))
    slices = pl.thread_pool_size() if rows.height >= PARALLEL_MIN_ROWS else 1
    if slices > 1 and kinds <= {"numeric", "multiple_choice"}:
        # Every verdict depends only on its row and its prompt, so contiguous slices are
        # judged in Python threads (Polars releases the GIL while it computes) and put
        # back in order. Many of the steps (a regex over the rows a finder still has
        # open, a gather or scatter) run on one thread for a one-chunk column: one slice
        # per Polars thread keeps every core busy. The streaming engine would split the
        # rows into morsels by itself, but only for whole-column expressions: every
        # finder would then search every row (measured: 1.1-1.3 CPU-s per 1M rows for
        # the finders against 0.9-1.2 for the cascade of `numeric.raw_answers`).
        # Code and custom verifiers run their own workers, so a round with them is
        # judged in one piece. The join above runs once, on all threads: per slice it
        # would hash every prompt once per slice.
        size = -(-rows.height // slices)
        parts = [rows.slice(i * size, size) for i in range(slices)]
        with ThreadPoolExecutor(slices) as pool:
            judged = list(pool.map(lambda part: _critiques(part, choices), parts))
        return pl.concat(judged)
    return _critiques(rows, choices)


def cut_off_rows(generations: pl.DataFrame) -> pl.Series:
    """Whether each generation stopped at the token limit (finish_reason "length")."""
    return (generations["finish_reason"] == "length").fill_null(False).alias("cut_off")


def _critiques(rows: pl.DataFrame, choices: dict[str, dict[str, str]]) -> pl.DataFrame:
    """`critique_generations` on generations joined with their prompt's answers."""
    if "_kind" not in rows.columns:  # numeric only: no split
        return _critique_columns(_judge_group("numeric", rows, choices))
    rows = rows.with_row_index("_order")
    groups = rows.with_columns(_kind=pl.col("_kind").fill_null("numeric")).partition_by(
        "_kind", as_dict=True, include_key=False
    )
    judged = [_judge_group(str(name[0]), part, choices) for name, part in groups.items()]
    out = pl.concat(judged, how="vertical_relaxed").sort("_order") if judged else None
    return _critique_columns(_judged_empty(rows) if out is None else out.drop("_order"))


def judge_rows(generations: pl.DataFrame, prompts: pl.DataFrame) -> pl.DataFrame:
    """Each generation with what its verifier reads: completion, answer and the prompt's
    verifier columns (in generation order)."""
    extra = [c for c in VERIFIER_COLUMNS if c in prompts.columns]
    answers = prompts.select("prompt_id", "answer", *extra).unique("prompt_id", keep="first")
    return _joined(generations, answers)


def _joined(generations: pl.DataFrame, answers: pl.DataFrame) -> pl.DataFrame:
    return generations.select("round", "generation_id", "prompt_id", "completion").join(
        answers, on="prompt_id", how="left", maintain_order="left"
    )


def _prompt_answers(
    prompts: pl.DataFrame,
) -> tuple[pl.DataFrame, dict[str, dict[str, str]]]:
    """One row per prompt: answer, the verifier columns, and what the vectorized
    verifiers read: `_kind` (the verifier), `_reference` (numeric: the canonical
    number), `_label` (multiple choice: the correct label); and the parsed choices of
    the multiple-choice prompts by prompt id. A prompt whose reference is unusable gets
    a null here; the error is raised only if a generation needs it."""
    from selfimprove_dagster.verifiers import multiple_choice, numeric

    extra = [c for c in VERIFIER_COLUMNS if c in prompts.columns]
    answers = prompts.select("prompt_id", "answer", *extra).unique("prompt_id", keep="first")
    kind = pl.col("verifier").fill_null("numeric") if "verifier" in extra else pl.lit("numeric")
    answers = answers.with_columns(_kind=kind)
    reference = pl.repeat(None, answers.height, dtype=pl.String, eager=True).alias("_reference")
    numeric_rows = answers["_kind"] == "numeric"
    if numeric_rows.any():
        picked = answers["answer"].filter(numeric_rows)
        reference = reference.scatter(
            numeric_rows.arg_true(), numeric.references(picked, strict=False)
        )
    label = pl.repeat(None, answers.height, dtype=pl.String, eager=True).alias("_label")
    choices: dict[str, dict[str, str]] = {}
    choice_rows = answers["_kind"] == "multiple_choice"
    if choice_rows.any():
        picked = answers.filter(choice_rows)
        labels = []
        for prompt, answer, options in zip(
            picked["prompt_id"], picked["answer"], picked["choices"], strict=True
        ):
            try:
                choices[prompt] = multiple_choice.choice_map(options)
                labels.append(multiple_choice.reference_label(answer, choices[prompt]))
            except SelfImproveError:
                labels.append(None)
        label = label.scatter(choice_rows.arg_true(), pl.Series(labels, dtype=pl.String))
    return answers.with_columns(reference, label), choices


def _judge_group(name: str, part: pl.DataFrame, choices: dict[str, dict[str, str]]) -> pl.DataFrame:
    """`part` with extracted, correct, reason and `_code` (the verdict is a program's);
    `choices`: the parsed choices of the multiple-choice prompts (`_prompt_answers`)."""
    keep = [c for c in ("_order", "round", "generation_id", "prompt_id", "answer") if c in part]
    cut = [c for c in ("cut_off",) if c in part.columns]  # rationale rounds (`cut_off_rows`)
    if name == "numeric":
        from selfimprove_dagster.verifiers.numeric import references, verify_frame

        unusable = part["_reference"].is_null()
        if unusable.any():
            references(part["answer"].filter(unusable))  # raises the reference's error
        judged = verify_frame(part.select(*keep, "completion", "_reference", *cut), "_reference")
    elif name == "multiple_choice":
        from selfimprove_dagster.verifiers.multiple_choice import (
            choice_map,
            reference_label,
            verify_frame,
        )

        # The correct label and the parsed choices were worked out once per prompt
        # (`_prompt_answers`); Python reads the choices only for the rows that need
        # the option-text search.
        unusable = part["_label"].is_null()
        if unusable.any():
            row = part.filter(unusable).row(0, named=True)
            reference_label(row["answer"], choice_map(row["choices"]))  # raises its error
        judged = verify_frame(
            part.select(*keep, "completion", *cut).with_columns(answer=part["_label"]),
            choices_by_prompt=choices,
        )
    else:
        verdicts = verify_rows(
            part["completion"].to_list(),
            part.drop("completion", "_kind", "_reference", "_label", strict=False).to_dicts(),
        )
        judged = part.select(*keep).with_columns(
            extracted=pl.Series([_short_extracted(v) for v in verdicts], dtype=pl.String),
            correct=pl.Series([v.correct for v in verdicts], dtype=pl.Boolean),
            reason=pl.Series([v.reason for v in verdicts], dtype=pl.String),
        )
    return judged.select(*keep, "extracted", "correct", "reason").with_columns(
        _code=pl.lit(name == "code")
    )


def _judged_empty(rows: pl.DataFrame) -> pl.DataFrame:
    return rows.select("_order", "round", "generation_id", "prompt_id", "answer").with_columns(
        extracted=pl.lit(None, pl.String),
        correct=pl.lit(None, pl.Boolean),
        reason=pl.lit(None, pl.String),
        _code=pl.lit(False),
    )


def _critique_columns(judged: pl.DataFrame) -> pl.DataFrame:
    """Critique rows from judged rows; the critique text is built with expressions
    (the same words as `verifier_message`)."""
    reference = pl.col("answer").cast(pl.String)
    relation = (
        pl.when(pl.col("correct")).then(pl.lit("matches")).otherwise(pl.lit("does not match"))
    )
    message = (
        pl.when(pl.col("extracted").is_null())
        .then(pl.format("no final answer found; reference {}", reference))
        .otherwise(
            pl.format("answer {} {} the reference {}", pl.col("extracted"), relation, reference)
        )
    )
    if (judged["reason"] == "cut_off").any():  # rationale rounds only (`cut_off_rows`)
        message = (
            pl.when(pl.col("reason") == "cut_off")
            .then(pl.format(CUT_OFF_WORDS + "; reference {}", reference))
            .otherwise(message)
        )
    if judged["_code"].any():  # every branch is built for every row: only when needed
        message = (
            pl.when(pl.col("_code") & pl.col("correct"))
            .then(pl.lit("the code passes all tests"))
            .when(pl.col("_code"))
            .then(pl.format("the code fails: {}", pl.col("reason")))
            .otherwise(message)
        )
    return judged.select(
        "round",
        "generation_id",
        "prompt_id",
        critic=pl.lit("verifier"),
        verdict=pl.when(pl.col("correct")).then(pl.lit("accept")).otherwise(pl.lit("reject")),
        correct=pl.col("correct"),
        extracted_answer=pl.col("extracted").cast(pl.String),
        reference_answer=reference,
        reason=pl.col("reason"),
        score=pl.col("correct").cast(pl.Float64),
        critique=message,
    )


def critiques_frame(
    rows: pl.DataFrame, verdicts: list[Verdict], critic: str = "verifier"
) -> pl.DataFrame:
    """Critique rows from judged rows (round, generation_id, prompt_id, answer) and
    their verdicts (one per row)."""
    correct = [v.correct for v in verdicts]
    references = rows["answer"].to_list()
    return pl.DataFrame(
        {
            "round": rows["round"],
            "generation_id": rows["generation_id"],
            "prompt_id": rows["prompt_id"],
            "critic": [critic] * rows.height,
            "verdict": ["accept" if c else "reject" for c in correct],
            "correct": correct,
            "extracted_answer": [_short_extracted(v) for v in verdicts],
            "reference_answer": references,
            "reason": [v.reason for v in verdicts],
            "score": [1.0 if c else 0.0 for c in correct],
            "critique": [verifier_message(v, r) for v, r in zip(verdicts, references, strict=True)],
        },
        schema_overrides={
            "extracted_answer": pl.String,
            "reference_answer": pl.String,
            "correct": pl.Boolean,
            "score": pl.Float64,
        },
    )


def _short_extracted(verdict: Verdict) -> str | None:
    # A code verdict's extracted answer is the whole program: keep the row readable.
    text = verdict.extracted
    return text if text is None or len(text) <= 2000 else text[:2000] + "..."


def verifier_message(verdict: Verdict, reference: object, code: bool = False) -> str:
    """The verifier's verdict in words (what a person reading the critique row sees)."""
    if code:
        return (
            "the code passes all tests" if verdict.correct else f"the code fails: {verdict.reason}"
        )
    if verdict.reason == "cut_off":
        return f"{CUT_OFF_WORDS}; reference {reference}"
    if verdict.extracted is None:
        return f"no final answer found; reference {reference}"
    relation = "matches" if verdict.correct else "does not match"
    return f"answer {verdict.extracted} {relation} the reference {reference}"


def filter_accepted(
    generations: pl.DataFrame,
    critiques: pl.DataFrame,
    max_per_prompt: int,
    refinements: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Accepted samples, deduplicated per prompt, at most `max_per_prompt` per prompt.

    The cap keeps training cost flat as the policy improves (otherwise a good policy
    would hand the trainer k copies of every easy problem). Among duplicates and over
    the cap, sampled answers come before refined ones (Self-Refine's `refinements`,
    trained on the original prompt) and then the lowest sample index wins, so the
    choice is deterministic.

    Rationalized answers (STaR: written with the reference answer as a hint, trained
    on the prompt without it) come in through `refinements` rows whose `source` is
    "rationalized"; they only exist for prompts without an accepted sample.

    Rows: round, generation_id, prompt_id, prompt, completion, source
    (generated/refined/rationalized), hint_used (the hint a rationalized row was
    written with; null otherwise).
    """
    columns = ["round", "generation_id", "prompt_id", "sample_index", "prompt", "completion"]
    candidates = [
        generations.select(columns).with_columns(
            source=pl.lit("generated"), hint_used=pl.lit(None, dtype=pl.String)
        )
    ]
    if refinements is not None and refinements.height:
        source = pl.col("source") if "source" in refinements.columns else pl.lit("refined")
        hint = (
            pl.col("hint_used") if "hint_used" in refinements.columns else pl.lit(None, pl.String)
        )
        candidates.append(
            refinements.select(*columns, source=source, hint_used=hint.cast(pl.String))
        )
    # The steps below move only the columns they read (and the row number); the wide
    # columns (prompt, round, hint) are gathered once, for the rows kept.
    every = pl.concat(candidates).with_row_index("_row")
    narrow = every.select(
        "_row", "generation_id", "prompt_id", "sample_index", "source", "completion"
    )
    if len(candidates) == 1 and critiques["generation_id"].equals(generations["generation_id"]):
        # The critiques of `critique_generations`: one per generation, in its order (the
        # comparison costs a fraction of the join below). With unique generation ids
        # (an expectation of the generations table) the join keeps the same rows.
        accepted = narrow.filter(critiques["verdict"] == "accept")
    else:
        accepted = narrow.join(
            critiques.filter(pl.col("verdict") == "accept").select("generation_id"),
            on="generation_id",
            how="semi",
        )
    # After the sort a prompt's rows are contiguous, so the rank within the prompt is
    # the row's distance from the prompt's first row (the same as a window per prompt,
    # without hashing the prompt ids again); `is_first_distinct` is `unique(keep=
    # "first", maintain_order=True)` as a filter.
    index = pl.int_range(pl.len(), dtype=pl.UInt32)
    starts = (index == 0) | pl.col("prompt_id").ne_missing(pl.col("prompt_id").shift(1))
    rank = index - pl.when(starts).then(index).forward_fill()
    kept = (
        # A stable sort: measured 3x faster than the default here, and ties keep their order.
        accepted.sort(
            "prompt_id", pl.col("source") != "generated", "sample_index", maintain_order=True
        )
        .select("_row", "prompt_id", pl.col("completion").str.strip_chars().str.to_lowercase())
        .filter(pl.struct("prompt_id", "completion").is_first_distinct())
        .filter(rank < max_per_prompt)
    )
    return every.select(
        "round", "generation_id", "prompt_id", "prompt", "completion", "source", "hint_used"
    )[kept["_row"]]


def training_examples(filtered: pl.DataFrame) -> list[dict[str, str]]:
    return filtered.select("prompt", "completion").to_dicts()


def filtered_content_hash(filtered: pl.DataFrame) -> str:
    """What the checkpoint was trained on: hash of (generation_id, prompt, completion)."""
    return content_hash(filtered.select("generation_id", "prompt", "completion").to_dicts())


def generation_figures(generations: pl.DataFrame, engine_stats: dict) -> dict:
    """What the `generations` step reports: throughput, completion length and the share
    of samples that hit the token limit."""
    return {
        "tokens_per_second": round(engine_stats.get("tokens_per_s", 0.0), 1),
        "generation_seconds": round(engine_stats.get("seconds", 0.0), 1),
        "mean_completion_tokens": float(generations["completion_tokens"].mean() or 0.0),
        "hit_length_limit_rate": float((generations["finish_reason"] == "length").mean() or 0.0),
    }
