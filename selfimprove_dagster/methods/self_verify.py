"""Self-verify critic: SFT-sharpening by the policy's own likelihood, no labels.

Huang et al. (2024), "Self-Improvement in Language Models: The Sharpening Mechanism":
the maximum-likelihood variant of sharpening samples k answers per prompt, keeps the
one the policy itself finds most likely, and fine-tunes on it (SFT-sharpening). Here
the likelihood is length-normalized: the mean log-probability per completion token
under the round's policy, given the chat-templated prompt (without normalization the
shortest answer would always win).

    generations ─ mean token log-prob under the policy ─> critiques (accept: the best
    sample of each prompt) ─ filter ─> filtered ─ SFT ─> checkpoint

Ground truth is recorded in `correct` (to measure how often the pick is right, and
against picking at random), never used to pick. Compare with `self_consistency`, which
picks by agreement between the samples' answers instead of by likelihood.
"""

from __future__ import annotations

import math

import polars as pl

from selfimprove_dagster.engines.base import GenerationEngine
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.methods import critique_rows
from selfimprove_dagster.progress import LogFn

CRITIC = "self_likelihood"
BATCH = 32  # sequences scored per forward pass


def mean_token_logprobs(
    model, tokenizer, prompt_texts: list[str], completions: list[str], batch: int = BATCH
) -> list[float | None]:
    """Mean log-probability per completion token of each completion after its prompt
    (`prompt_texts` already chat-templated). None for an empty completion."""
    import torch

    out: list[float | None] = []
    for start in range(0, len(completions), batch):
        prompts = prompt_texts[start : start + batch]
        replies = completions[start : start + batch]
        prefix = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        reply = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies]
        width = max(len(p) + len(r) for p, r in zip(prefix, reply, strict=True))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(prefix), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prefix), width), dtype=torch.long)
        for i, (p, r) in enumerate(zip(prefix, reply, strict=True)):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, : len(p) + len(r)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_lp = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for i, (p, r) in enumerate(zip(prefix, reply, strict=True)):
            if not r:
                out.append(None)
                continue
            # token t is predicted at position t-1
            out.append(float(token_lp[i, len(p) - 1 : len(p) + len(r) - 1].mean()))
    return out


def critique_by_likelihood(
    engine: GenerationEngine | None,
    generations: pl.DataFrame,
    prompts: pl.DataFrame,
    log: LogFn | None = None,
) -> pl.DataFrame:
    """One verdict per generation: accept the sample of each prompt with the highest
    mean token log-probability under the policy (ties: the lowest sample index).

    Rows: the shared critique columns (critic `self_likelihood`; score = exp(mean token
    log-prob), the per-token likelihood in 0..1; reason `best_likelihood` /
    `lower_likelihood` / `empty`), mean_logprob, likelihood_rank (1 = picked).
    """
    from selfimprove_dagster.engines.pool import LentEngine

    if isinstance(engine, LentEngine):  # the run's pooled engine, on loan to this step
        engine = engine.engine
    model = getattr(engine, "model", None)
    tokenizer = getattr(engine, "tokenizer", None)
    if model is None or tokenizer is None or not hasattr(engine, "chat_text"):
        raise SelfImproveError(
            "self_verify scores samples with the policy's own log-probabilities, which "
            "this generation engine does not expose",
            "use the transformers engine in the step's own process for self_verify "
            "(generator.engine=transformers, generator.pool=local; SELFIMPROVE_ENGINE / "
            "SELFIMPROVE_POOL for the demo loop)",
        )
    ordered = generations.sort("prompt_id", "sample_index")
    chat = {p: engine.chat_text(p) for p in ordered["prompt"].unique().to_list()}
    if log:
        log(f"self_verify: scoring {ordered.height} samples with the policy's likelihood")
    scores = mean_token_logprobs(
        model,
        tokenizer,
        [chat[p] for p in ordered["prompt"]],
        ordered["completion"].to_list(),
    )
    scored = ordered.with_columns(mean_logprob=pl.Series(scores, dtype=pl.Float64)).with_columns(
        likelihood_rank=pl.col("mean_logprob")
        .fill_null(-math.inf)
        .rank("ordinal", descending=True)
        .over("prompt_id")
        .cast(pl.Int64)
    )
    references = dict(zip(prompts["prompt_id"], prompts["answer"], strict=True))
    truths = critique_rows.ground_truths(scored, prompts)  # measured, never a training signal
    rows = []
    for g, truth in zip(scored.iter_rows(named=True), truths, strict=True):
        picked = g["likelihood_rank"] == 1 and g["mean_logprob"] is not None
        lp = g["mean_logprob"]
        reason = "empty" if lp is None else "best_likelihood" if picked else "lower_likelihood"
        rows.append(
            {
                **critique_rows.critique_row(
                    g,
                    CRITIC,
                    accepted=picked,
                    reference=references.get(g["prompt_id"]),
                    reason=reason,
                    score=math.exp(lp) if lp is not None else None,
                    critique=f"mean token log-prob {lp:.3f} (rank {g['likelihood_rank']})"
                    if lp is not None
                    else "empty completion",
                    truth=truth,
                ),
                "mean_logprob": lp,
                "likelihood_rank": g["likelihood_rank"],
            }
        )
    return pl.DataFrame(rows, schema=CRITIQUE_SCHEMA)


CRITIQUE_SCHEMA = {
    **critique_rows.CRITIQUE_SCHEMA,
    "mean_logprob": pl.Float64,
    "likelihood_rank": pl.Int64,
}


def pick_quality(critiques: pl.DataFrame) -> dict[str, float | None]:
    """How good the likelihood picks were, against ground truth where it exists.

    - self_verify_pick_accuracy: picked samples that are right.
    - self_verify_sample_accuracy: all samples that are right (picking at random).
    - self_verify_oracle: prompts with at least one right sample (the best a pick can do).
    """
    own = critiques.filter((pl.col("critic") == CRITIC) & pl.col("correct").is_not_null())
    if own.height == 0:
        return {
            "self_verify_pick_accuracy": None,
            "self_verify_sample_accuracy": None,
            "self_verify_oracle": None,
        }
    picked = own.filter(pl.col("verdict") == "accept")
    per_prompt = own.group_by("prompt_id").agg(pl.col("correct").any())
    return {
        "self_verify_pick_accuracy": float(picked["correct"].mean()) if picked.height else None,
        "self_verify_sample_accuracy": float(own["correct"].mean()),
        "self_verify_oracle": float(per_prompt["correct"].mean()),
    }
