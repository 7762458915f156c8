"""The STaR / ReST-EM steps of a round as functions on Polars frames.

    prompts ─ sample k per train prompt ─> generations ─ verifier ─> critiques
            ─ keep accepted, dedupe, cap per prompt ─> filtered ─ LoRA SFT ─> checkpoint

Each function takes and returns plain frames, so it is tested without Dagster or a
model; the assets in `assets/rounds.py` call them in that order.
"""

from __future__ import annotations

import polars as pl

from selfimprove_dagster.engines.base import Completion, GenerationEngine, Sampling
from selfimprove_dagster.ids import content_hash, generation_id
from selfimprove_dagster.progress import LogFn
from selfimprove_dagster.verifiers.numeric import Verdict, verify


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


def critique_generations(generations: pl.DataFrame, prompts: pl.DataFrame) -> pl.DataFrame:
    """The verifier's verdict on every generation.

    Rows: round, generation_id, prompt_id, critic, verdict (accept/reject), correct,
    extracted_answer, reference_answer, reason, score, critique (the verdict in words).
    """
    answers = dict(zip(prompts["prompt_id"], prompts["answer"], strict=True))
    rows = []
    for g in generations.iter_rows(named=True):
        reference = answers[g["prompt_id"]]
        verdict = verify(g["completion"], reference)
        rows.append(
            {
                "round": g["round"],
                "generation_id": g["generation_id"],
                "prompt_id": g["prompt_id"],
                "critic": "verifier",
                "verdict": "accept" if verdict.correct else "reject",
                "correct": verdict.correct,
                "extracted_answer": verdict.extracted,
                "reference_answer": reference,
                "reason": verdict.reason,
                "score": 1.0 if verdict.correct else 0.0,
                "critique": verifier_message(verdict, reference),
            }
        )
    return pl.DataFrame(
        rows, schema_overrides={"extracted_answer": pl.String, "reference_answer": pl.String}
    )


def verifier_message(verdict: Verdict, reference: object) -> str:
    """The verifier's verdict in words (what a person reading the critique row sees)."""
    if verdict.extracted is None:
        return f"no final number found; reference {reference}"
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

    Rows: round, generation_id, prompt_id, prompt, completion, source (generated/refined).
    """
    columns = ["round", "generation_id", "prompt_id", "sample_index", "prompt", "completion"]
    candidates = [generations.select(columns).with_columns(source=pl.lit("generated"))]
    if refinements is not None and refinements.height:
        candidates.append(refinements.select(columns).with_columns(source=pl.lit("refined")))
    accepted = pl.concat(candidates).join(
        critiques.filter(pl.col("verdict") == "accept").select("generation_id"),
        on="generation_id",
        how="semi",
    )
    return (
        accepted.sort("prompt_id", pl.col("source") == "refined", "sample_index")
        .with_columns(_normalized=pl.col("completion").str.strip_chars().str.to_lowercase())
        .unique(subset=["prompt_id", "_normalized"], keep="first", maintain_order=True)
        .filter(pl.int_range(pl.len()).over("prompt_id") < max_per_prompt)
        .select("round", "generation_id", "prompt_id", "prompt", "completion", "source")
    )


def training_examples(filtered: pl.DataFrame) -> list[dict[str, str]]:
    return filtered.select("prompt", "completion").to_dicts()


def filtered_content_hash(filtered: pl.DataFrame) -> str:
    """What the checkpoint was trained on: hash of (generation_id, prompt, completion)."""
    return content_hash(filtered.select("generation_id", "prompt", "completion").to_dicts())
