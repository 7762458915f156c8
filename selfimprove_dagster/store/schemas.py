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

# Tables an online RL round's checkpoint step writes beside `checkpoints`.
ROLLOUTS_TABLE = "rollouts"  # one row per rollout (generations + critiques columns)
STEPS_TABLE = "rl_steps"  # one row per optimizer step (RL health figures)

# Figures a method adds to `eval_scores` (`methods.recipe.method_metrics`; null where the
# round's method has none).
METRIC_COLUMNS = (
    "pseudo_labeled_prompts",
    "pseudo_label_precision",
    "pseudo_label_recall",
    "judge_unparseable_rate",
    "judge_unscored",
    "judge_accuracy",
    "pair_accuracy",
    "pairs",
    "refined",
    "repaired",
    "repair_rate",
    "probed",
    "broken",
    "broken_rate",
    "self_verify_pick_accuracy",
    "self_verify_sample_accuracy",
    "self_verify_oracle",
)

# Columns an RL round adds to `eval_scores` (`quality.rl_health.health_summary`; null for
# other methods).
HEALTH_COLUMNS = (
    "rl_steps",
    "rl_rollouts",
    "rl_reward_first",
    "rl_reward_last",
    "rl_reward_mean",
    "rl_reward_std_mean",
    "rl_zero_std_fraction",
    "rl_kl_last",
    "rl_entropy_first",
    "rl_entropy_last",
    "rl_length_first",
    "rl_length_last",
    "rl_truncated_fraction",
    "rl_clip_ratio",
)


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a Polars type name
    description: str = ""
    required: bool = False  # the GE suite expects it to exist


def _c(spec: str, description: str = "", required: bool = False) -> Column:
    name, _, type_ = spec.partition(":")
    return Column(name, type_ or "String", description, required)


# Figures of `eval_scores` that are counts (the others are rates or means).
_COUNTS = {
    "pseudo_labeled_prompts", "judge_unscored", "pairs", "refined", "repaired", "probed",
    "broken", "rl_steps", "rl_rollouts",
}  # fmt: skip


def _count_or_rate(name: str) -> str:
    return "Int64" if name in _COUNTS else "Float64"


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
        _c(
            "verifier",
            "verifier of the row: numeric / multiple_choice / math / code / "
            "module:function (null: numeric)",
        ),
        _c("choices", "multiple choice: JSON object label -> option text"),
        _c("tests:List(String)", "code: test statements (asserts, or HumanEval's check)"),
        _c("test_setup", "code: run before the tests"),
        _c("entry_point", "code: the function the tests call"),
    ),
    "prompt_mix": (
        _c("round", "round key"),
        _c("source", "prompt source"),
        _c("weight:Float64", "its share of the train prompts"),
        _c("train_rows:Int64", "train prompts it gave"),
        _c("eval_rows:Int64", "held-out prompts it gave"),
        _c("chosen_band:Int64", "curriculum: the band trained on"),
        _c("chosen_band_solve_rate:Float64", "curriculum: that band's measured solve rate"),
        _c("band_reason", "curriculum: why that band (names the figures)"),
        _c("solve_rates", "curriculum: JSON band -> solve rate"),
        _c("rates_from_round", "curriculum measure=previous_round: the round measured"),
        _c("rates_measured_on", "curriculum: what the solve rates were measured on"),
        _c("train_by_band_role", "curriculum: JSON band/role -> train prompts"),
        _c("eval_bands", "curriculum: bands of the held-out set"),
        _c("requested:Int64", "self_instruct: prompts asked for"),
        _c("candidates:Int64", "self_instruct: candidates written"),
        _c("dedup_rate:Float64", "self_instruct: near-duplicates among filtered candidates"),
        _c("drop_counts", "self_instruct: JSON drop reason -> candidates"),
        _c("pool_from_earlier_rounds:Int64", "self_instruct: earlier synthesized prompts"),
        _c("seed_tasks:Int64", "self_instruct: seed tasks loaded"),
    ),
    "prompt_candidates": (
        _c("round", "round key"),
        _c("candidate_id", "<round>:<pass>:<request>"),
        _c("pass_index:Int64", "synthesis pass"),
        _c("raw_text", "what the policy wrote"),
        _c("instruction", "parsed from it (null: unparseable)"),
        _c("prompt", "the train prompt it would become"),
        _c("prompt_id", "hash of the prompt text"),
        _c("seed_ids:List(String)", "seed tasks shown in context"),
        _c("parent_prompt_ids:List(String)", "earlier synthesized prompts shown"),
        _c("kept:Boolean", "kept as a train prompt"),
        _c(
            "drop_reason",
            "why it was dropped (null: kept); `contaminated`: a dataset "
            "train row dropped at load time",
        ),
        _c("drop_detail", "the keyword, the similar text, the eval prompt, the match, ..."),
        _c("max_rouge_l:Float64", "ROUGE-L to everything kept before it"),
        _c("samples:List(String)", "the ensemble's answers"),
        _c("consensus_output", "the sample the others agree with"),
        _c("agreement:Float64", "mean ROUGE-L of the consensus sample to the others"),
        _c("answer", "the consensus's number (model-made); contaminated: the row's answer"),
        _c("source", "who proposed it: self_instruct, or dataset (contaminated rows)"),
        _c("eval_prompt", "eval_overlap / contaminated: the held-out prompt it matched"),
        _c("similarity:Float64", "similarity to that held-out prompt (1.0: exact copy)"),
    ),
    "curriculum_measure": (
        _c("band:Int64", "difficulty band"),
        _c("prompt_id", "hash of the prompt text"),
        _c("prompt", "probe problem"),
        _c("answer", "its reference answer"),
        _c("sample_index:Int64", "sample of the policy"),
        _c("completion", "the policy's answer"),
        _c("correct:Boolean", "verified correct"),
        _c("round", "round key"),
        _c("policy", "the policy measured"),
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
        _c("pseudo_label", "self_consistency: the prompt's majority answer (null: none)"),
        _c("agreement:Float64", "self_consistency: share of the samples on the majority"),
        _c("judge_points:Float64", "self_judge: mean rubric points (0-5)"),
        _c("judge_replies:Int64", "self_judge: judge replies sampled"),
        _c("judge_parsed:Int64", "self_judge: of which had a readable score"),
        _c("mean_logprob:Float64", "self_verify: mean token log-probability"),
        _c("likelihood_rank:Int64", "self_verify: rank in its prompt (1 = picked)"),
    ),
    "refinements": (
        _c("round", "round key"),
        _c("generation_id", "id of the refined answer"),
        _c("parent_generation_id", "the sample it rewrote"),
        _c("prompt_id", "hash of the prompt text"),
        _c("sample_index:Int64", "sample index of the parent (rationalized: of the hint)"),
        _c("prompt", "the problem (without a hint)"),
        _c("original_completion", "self_refine: the answer it rewrote"),
        _c("probe:Boolean", "self_refine: an accepted sample refined to count breakage"),
        _c("feedback_source", "self_refine: critic / self / neutral"),
        _c("feedback", "the critique the refiner saw"),
        _c("completion", "the refined answer"),
        _c("completion_tokens:Int64", "answer length in tokens"),
        _c("finish_reason", "stop / length"),
        _c("hinted_prompt", "rationalized: the prompt with the hint"),
        _c("source", "refined / rationalized"),
        _c("hint_used", "rationalized: the answer given as the hint"),
    ),
    "filtered": (
        _c("round", "round key"),
        _c("generation_id", "the kept generation", R),
        _c("prompt_id", "hash of the prompt text", R),
        _c("prompt", "the problem", R),
        _c("completion", "the training target", R),
        _c("source", "generated / refined / rationalized / rl_prompt", R),
        _c("hint_used", "rationalized: the answer given as the hint"),
        _c("rejected_generation_id", "DPO pairs: the rejected answer"),
        _c("rejected_completion", "DPO pairs: its text"),
        _c("chosen_score:Float64", "DPO pairs"),
        _c("rejected_score:Float64", "DPO pairs"),
        _c("margin:Float64", "DPO pairs: chosen - rejected score"),
        _c("answer", "grpo/rloo: the prompt's reference answer"),
        _c("samples:UInt32", "grpo/rloo: starting-policy samples of the prompt"),
        _c("reward_mean:Float64", "grpo/rloo: their mean reward"),
        _c("reward_std:Float64", "grpo/rloo: their reward spread"),
        _c("has_signal:Boolean", "grpo/rloo: rewards differ (a learning signal)"),
        _c("selected_reason", "grpo/rloo: mixed_rewards / never_solved / always_solved / all"),
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
        _c("generation_id", "hash of (round, step, prompt_id, index in its group)", R),
        _c("prompt_id", "hash of the prompt text", R),
        _c("sample_index:Int64", "index in its group"),
        _c("prompt", "the problem", R),
        _c("completion", "the sampled answer", R),
        _c("prompt_tokens:Int64", "prompt length in tokens (null: not logged)"),
        _c("completion_tokens:Int64", "answer length in tokens"),
        _c("finish_reason", "stop / length"),
        _c("policy", "the round's starting policy"),
        _c("temperature:Float64", "rollout temperature"),
        _c("top_p:Float64", "nucleus sampling"),
        _c("top_k:Int64", "top-k sampling"),
        _c("max_new_tokens:Int64", "rollout budget"),
        _c("seed:Int64", "sampling seed (null: the trainer's)"),
        _c("critic", "verifier"),
        _c("verdict", "accept / reject", R),
        _c("correct:Boolean", "the verifier's verdict"),
        _c("extracted_answer", "answer parsed from the completion"),
        _c("reference_answer", "the prompt's answer"),
        _c("reason", "why the verdict"),
        _c("score:Float64", "the verifier's reward (0-1)"),
        _c("critique", "the verdict in words"),
        _c("phase", "always `rollout` (generations rows are the exploration phase)", R),
        _c("step:Int64", "the optimizer step it trained (from 1)", R),
        _c("policy_version:Int64", "optimizer updates applied before it was sampled"),
        _c("reward:Float64", "weighted sum of the rewards", R),
        _c("verifier_reward:Float64", "the verifier's reward"),
        _c("format_reward:Float64", "the format reward (null without one)"),
        _c("advantage:Float64", "the trainer's advantage for the rollout"),
    ),
    "rl_steps": (
        _c("round", "round key"),
        _c("step:Int64", "optimizer step"),
        _c("reward_mean:Float64", "mean reward of the step's rollouts"),
        _c("reward_std:Float64", "spread of the step's rewards"),
        _c("zero_std_fraction:Float64", "share of groups without reward variance"),
        _c("kl:Float64", "KL to the starting policy (null with beta 0)"),
        _c("entropy:Float64", "mean token entropy"),
        _c("mean_completion_tokens:Float64", "mean rollout length"),
        _c("truncated_fraction:Float64", "share of rollouts at the length limit"),
        _c("clip_ratio:Float64", "share of clipped token ratios"),
        _c("loss:Float64", "training loss"),
        _c("grad_norm:Float64", "gradient norm"),
        _c("learning_rate:Float64", "learning rate"),
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
        _c("train_pass_at_k:Float64", "pass@k of the round's samples on its train prompts"),
        _c("train_distinct_correct_per_prompt:Float64", "distinct correct answers a prompt"),
        _c("train_answer_diversity:Float64", "distinct answers / samples"),
        _c("train_solved_fraction:Float64", "train prompts with a correct sample"),
        _c("selection_precision:Float64", "kept rows that are right (ground truth)"),
        _c("selection_recall:Float64", "right samples that were kept"),
        _c("critic_precision:Float64", "accepted samples that are right"),
        _c("critic_recall:Float64", "right samples the critic accepted"),
        _c("balance_score:Float64", "B-STaR balance of exploration and exploitation"),
        _c("rationalized_share:Float64", "filtered rows written with a hint"),
        _c("truncated_share:Float64", "samples that stopped at the token limit"),
        _c("method", "the round's method"),
        *(
            _c(f"{name}:{_count_or_rate(name)}", "method figure (null where the method has none)")
            for name in METRIC_COLUMNS
        ),
        *(
            _c(f"{name}:{_count_or_rate(name)}", "online RL health (null for other methods)")
            for name in HEALTH_COLUMNS
        ),
        _c("next_temperature:Float64", "auto_temperature: the next round's temperature"),
        _c("next_temperature_reason", "auto_temperature: why"),
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


def polars_schema(table: str) -> dict:
    """`{column: polars dtype}` of the declared columns of `table` (scalar types only):
    the schema a frame of that table is built with when it may be empty."""
    import polars as pl

    return {c.name: getattr(pl, c.type) for c in columns(table)}
