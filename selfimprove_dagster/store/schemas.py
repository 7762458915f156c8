"""The columns of every round table: one source of truth for the Dagster column schemas
(`dagster/column_schema`, the asset's Columns tab) and the Great Expectations suites
(`quality.expectations`: a `required` column gets an ExpectColumnToExist).

    columns("generations")           # [Column(name, type, description, required), ...]
    required_columns("generations")  # the names every generations table must have

Plain data: the Dagster layer turns it into `dg.TableSchema` (`assets/rounds.py`).
Columns some methods add (self_consistency's pseudo_label, ...) are listed, not
required.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a Polars type name
    description: str = ""
    required: bool = False  # the GE suite expects it to exist


def _c(spec: str, description: str = "", required: bool = False) -> Column:
    name, _, type_ = spec.partition(":")
    return Column(name, type_ or "String", description, required)


R = True  # required: marks the columns the GE suite of the table checks exist

TABLE_COLUMNS: dict[str, tuple[Column, ...]] = {
    "prompts": (
        _c("round", "round key", R),
        _c("prompt_id", "hash of the prompt text", R),
        _c("prompt", "the problem as the policy sees it", R),
        _c("answer", "reference answer (null: none)", R),
        _c("split", "train (sampled from) or eval (held out)", R),
        _c("task", "task or family name, dataset stem, or self_instruct", R),
        _c("source", "task / dataset / curriculum / self_instruct"),
        _c("band:Int64", "curriculum difficulty band"),
        _c("role", "curriculum: chosen / replay / probe"),
        _c("answer_source", "generator / dataset / ensemble_consensus"),
        _c("answer_verified:Boolean", "False: the answer is model-made"),
        _c("origin_round", "round a synthesized prompt was written in"),
        _c("seed_ids:List(String)", "seed tasks it was written from"),
        _c("parent_prompt_ids:List(String)", "earlier synthesized prompts it saw"),
    ),
    "prompt_mix": (
        _c("round", "round key"),
        _c("source", "prompt source"),
        _c("weight:Float64", "its share of the train prompts"),
    ),
    "prompt_candidates": (
        _c("round", "round key"),
        _c("candidate_id", "<round>:<pass>:<request>"),
        _c("pass_index:Int64", "synthesis pass"),
        _c("raw_text", "what the policy wrote"),
        _c("instruction", "parsed from it (null: unparseable)"),
        _c("prompt", "the train prompt it would become"),
        _c("prompt_id", "hash of the prompt text"),
        _c("kept:Boolean", "kept as a train prompt"),
        _c("drop_reason", "why it was dropped (null: kept)"),
        _c("drop_detail", "the keyword, the similar text, the eval prompt, ..."),
        _c("max_rouge_l:Float64", "ROUGE-L to everything kept before it"),
        _c("agreement:Float64", "mean ROUGE-L of the consensus sample to the others"),
    ),
    "curriculum_measure": (
        _c("band:Int64", "difficulty band"),
        _c("prompt_id", "hash of the prompt text"),
        _c("prompt", "probe problem"),
        _c("answer", "its reference answer"),
        _c("sample_index:Int64", "sample of the policy"),
        _c("completion", "the policy's answer"),
        _c("correct:Boolean", "verified correct"),
    ),
    "generations": (
        _c("round", "round key"),
        _c("generation_id", "hash of (round, prompt_id, sample_index)", R),
        _c("prompt_id", "hash of the prompt text", R),
        _c("sample_index:Int64", "0..k-1"),
        _c("prompt", "the problem", R),
        _c("completion", "the sampled answer", R),
        _c("prompt_tokens:Int64", "prompt length in tokens"),
        _c("completion_tokens:Int64", "answer length in tokens", R),
        _c("finish_reason", "stop / length", R),
        _c("policy", "model reference that sampled it"),
        _c("temperature:Float64", "sampling temperature", R),
        _c("top_p:Float64", "nucleus sampling"),
        _c("top_k:Int64", "top-k sampling"),
        _c("max_new_tokens:Int64", "sampling budget"),
        _c("seed:Int64", "sampling seed"),
    ),
    "critiques": (
        _c("round", "round key"),
        _c("generation_id", "the critiqued generation", R),
        _c("prompt_id", "hash of the prompt text"),
        _c("critic", "verifier / majority / judge / refiner", R),
        _c("verdict", "accept / reject", R),
        _c("correct:Boolean", "ground truth, where there is one"),
        _c("extracted_answer", "answer parsed from the completion"),
        _c("reference_answer", "the prompt's answer"),
        _c("reason", "why the verdict"),
        _c("score:Float64", "0-1", R),
        _c("critique", "critic text"),
    ),
    "refinements": (
        _c("round", "round key"),
        _c("generation_id", "id of the refined answer"),
        _c("parent_generation_id", "the sample it rewrote"),
        _c("prompt_id", "hash of the prompt text"),
        _c("feedback", "the critique the refiner saw"),
        _c("completion", "the refined answer"),
    ),
    "filtered": (
        _c("round", "round key"),
        _c("generation_id", "the kept generation", R),
        _c("prompt_id", "hash of the prompt text", R),
        _c("prompt", "the problem", R),
        _c("completion", "the training target", R),
        _c("source", "generated / refined / rl_prompt", R),
        _c("rejected_generation_id", "DPO pairs: the rejected answer"),
        _c("rejected_completion", "DPO pairs: its text"),
        _c("chosen_score:Float64", "DPO pairs"),
        _c("rejected_score:Float64", "DPO pairs"),
        _c("margin:Float64", "DPO pairs: chosen - rejected score"),
    ),
    "checkpoints": (
        _c("round", "round key"),
        _c("path", "stable path of the round's checkpoint"),
        _c("version", "the checkpoint version this row describes"),
        _c("adapter_sha256", "content hash of the adapter"),
        _c("trained_from", "parent model (../round_N: a sibling checkpoint)"),
        _c("policy", "the policy that sampled its data"),
        _c("content_hash", "hash of the filtered rows it trained on"),
        _c("filtered_data_version", "data version of the filtered table it trained on"),
        _c("train_examples:Int64", "rows trained on"),
        _c("optimizer_steps:Int64", "steps run"),
        _c("planned_steps:Int64", "steps planned"),
        _c("final_loss:Float64", "last logged loss"),
    ),
    "rollouts": (
        _c("round", "round key"),
        _c("generation_id", "id of the rollout"),
        _c("prompt_id", "hash of the prompt text"),
        _c("completion", "the sampled answer"),
        _c("step:Int64", "RL step"),
    ),
    "rl_steps": (
        _c("round", "round key"),
        _c("step:Int64", "optimizer step"),
        _c("reward_mean:Float64", "mean reward of the step's rollouts"),
        _c("reward_std:Float64", "spread of the step's rewards"),
        _c("entropy:Float64", "mean token entropy"),
        _c("loss:Float64", "training loss"),
    ),
    "eval_scores": (
        _c("round", "round key"),
        _c("checkpoint", "the evaluated checkpoint"),
        _c("policy", "the policy that generated the round"),
        _c("accuracy_before:Float64", "held-out greedy accuracy of the policy"),
        _c("accuracy_after:Float64", "held-out greedy accuracy of the checkpoint"),
        _c("pass_at_k:Float64", "held-out pass@k of the checkpoint"),
        _c("k:Int64", "samples per prompt for pass@k"),
        _c("n_eval:Int64", "held-out prompts"),
        _c("kept:Int64", "filtered rows"),
        _c("kept_fraction:Float64", "filtered rows / generations"),
        _c("eval_seconds:Float64", "time spent evaluating"),
    ),
    "eval_details": (
        _c("prompt_id", "held-out prompt", R),
        _c("greedy_completion", "the checkpoint's greedy answer"),
        _c("greedy_answer", "answer parsed from it"),
        _c("greedy_correct:Boolean", "verified correct", R),
        _c("samples:Int64", "samples drawn for pass@k (null: not sampled)"),
        _c("samples_correct:Int64", "of which correct"),
        _c("pass_at_k:Float64", "unbiased pass@k", R),
        _c("round", "round key"),
    ),
}


def columns(table: str) -> tuple[Column, ...]:
    """The declared columns of `table` (empty for a table without a declaration)."""
    return TABLE_COLUMNS.get(table, ())


def required_columns(table: str) -> list[str]:
    """The columns every `table` must have (its GE suite checks they exist)."""
    return [c.name for c in columns(table) if c.required]
