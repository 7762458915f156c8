"""The evaluate stage of a round: the checkpoint's held-out `eval_scores` next to its
policy's (before -> after), with the per-prompt `eval_details`.

    eval_scores -> evaluation.score_round -> evaluation.evaluate_policy
"""

from collections.abc import Iterator

import dagster as dg

from assets.partitions import ROUNDS
from assets.tables import parent_metadata, save, side_results, table_result, table_spec
from resources import (
    EvolutionResource,
    GeneratorResource,
    MethodResource,
    StorageResource,
    TaskResource,
    TrainerResource,
)
from selfimprove_dagster.evaluation import ScoringPlan, score_round
from selfimprove_dagster.profiles import MODEL_POOL
from selfimprove_dagster.store.storage import round_index


def scoring_plan(round_, generator, task, trainer, evolution) -> ScoringPlan:
    """How the round is scored, from the loop's settings."""
    return ScoringPlan(
        sampling=generator.sampling(round_index(round_)),
        max_new_tokens=generator.max_new_tokens,
        eval_samples=task.eval_samples_per_prompt,
        pass_at_k_prompts=task.pass_at_k_prompts,
        samples_per_prompt=generator.samples_per_prompt,
        max_per_prompt=trainer.max_per_prompt,
        answer_format=generator.answer_format,  # as in `critiques`
        auto_temperature=evolution.auto_temperature,
        temperature_grid=tuple(evolution.temperature_grid),
        tuning_prompts=evolution.tuning_prompts,
    )


@dg.multi_asset(
    name="eval_scores",
    partitions_def=ROUNDS,
    pool=MODEL_POOL,
    specs=[
        # The round's monitors read its generations, critiques and filtered rows.
        table_spec(
            "eval_scores",
            "evaluate",
            deps=["eval_details", "checkpoint", "generations", "critiques", "filtered"],
            kinds={"python", "parquet", "pytorch"},
        ),
        table_spec(
            "eval_details",
            "evaluate",
            deps=["checkpoint", "prompts"],
            description="One row per held-out prompt: greedy answer, correct, pass@k.",
        ),
    ],
)
def eval_scores(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    generator: GeneratorResource,
    task: TaskResource,
    trainer: TrainerResource,
    evolution: EvolutionResource,
    method: MethodResource,
) -> Iterator[dg.MaterializeResult]:
    """Held-out scores of the round's checkpoint (greedy accuracy, pass@k) next to the
    accuracy of the policy that generated the round (before -> after), with the round's
    B-STaR monitors (the history across rounds is the `history` asset).

    Columns (one row): round, checkpoint, policy, accuracy_before, accuracy_after,
    pass_at_k, k, n_eval, kept, kept_fraction, train_pass_at_k,
    train_distinct_correct_per_prompt, train_answer_diversity, train_solved_fraction,
    selection_precision, selection_recall, critic_precision, critic_recall,
    balance_score, method and its figures (`schemas.METRIC_COLUMNS`: pseudo-label
    precision/recall, judge accuracy and unparseable replies, pairs, refinements
    repaired/broken; null where the method has none), the `rl_*` health of an online
    RL round, next_temperature, next_temperature_reason (with auto_temperature),
    eval_seconds. Per-prompt rows go to table `eval_details`.
    """
    store, round_ = storage.store(), context.partition_key
    scores = score_round(
        store,
        round_,
        method.recipe(),
        scoring_plan(round_, generator, task, trainer, evolution),
        load_engine=lambda ref: generator.load(ref, store.models_dir),
        log=context.log.info,
    )
    version = save(context, store, "eval_scores", scores.tables())
    # promoted_policy and history are assets of their own (assets/policy.py).
    context.log.info(f"{round_}: held-out accuracy {scores.before:.1%} -> {scores.after:.1%}")
    yield from side_results(version, "eval_details")
    yield table_result(
        version,
        "eval_scores",
        {
            **{k: v for k, v in scores.row.items() if v is not None and k != "round"},
            "accuracy_delta": scores.after - scores.before,
            **parent_metadata(*store.generation_policy(round_)),
        },
    )
