"""The evaluate stage of a round: the checkpoint's held-out `eval_scores` next to its
policy's (before -> after), with the per-prompt `eval_details`.

    eval_scores -> evaluation.score_round -> evaluation.evaluate_policy
"""

from collections.abc import Iterator

import dagster as dg

from selfimprove_dagster.assets.loop import Loop
from selfimprove_dagster.assets.tables import ROUND_KINDS, parent_metadata, table_spec
from selfimprove_dagster.evaluation import ScoringPlan, score_round
from selfimprove_dagster.profiles import MODEL_POOL
from selfimprove_dagster.store.storage import round_index
from selfimprove_dagster.verifiers.code import judge_metadata

EVAL_SCORES_DOC = """Held-out scores of the round's checkpoint (greedy accuracy, pass@k)
next to the accuracy of the policy that generated the round (before -> after), with
the round's B-STaR monitors (the history across rounds is the `history` asset).

Columns (one row): round, checkpoint, policy, accuracy_before, accuracy_after,
pass_at_k, k, n_eval, kept, kept_fraction, train_pass_at_k,
train_distinct_correct_per_prompt, train_answer_diversity, train_solved_fraction,
selection_precision, selection_recall, critic_precision, critic_recall, balance_score,
method and its figures (`schemas.METRIC_COLUMNS`; null where the method has none), the
`rl_*` health of an online RL round, next_temperature, next_temperature_reason (with
auto_temperature), eval_seconds. Per-prompt rows go to table `eval_details`."""


def scoring_plan(round_: str, s) -> ScoringPlan:
    """How the round is scored, from the run's settings."""
    return ScoringPlan(
        sampling=s.generator.sampling(round_index(round_)),
        max_new_tokens=s.generator.max_new_tokens,
        eval_samples=s.task.eval_samples_per_prompt,
        pass_at_k_prompts=s.task.pass_at_k_prompts,
        samples_per_prompt=s.generator.samples_per_prompt,
        max_per_prompt=s.trainer.max_per_prompt,
        answer_format=s.generator.answer_format,  # as in `critiques`
        auto_temperature=s.evolution.auto_temperature,
        temperature_grid=tuple(s.evolution.temperature_grid),
        tuning_prompts=s.evolution.tuning_prompts,
    )


def eval_scores_asset(loop: Loop) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=f"{loop.name}_eval_scores",
        partitions_def=loop.partitions,
        pool=MODEL_POOL,
        required_resource_keys=loop.resource_keys(),
        specs=[
            # The round's monitors read its generations, critiques and filtered rows.
            table_spec(
                loop,
                "eval_scores",
                "evaluate",
                deps=["eval_details", "checkpoint", "generations", "critiques", "filtered"],
                kinds=ROUND_KINDS | {"pytorch"},
                description=EVAL_SCORES_DOC,
            ),  # fmt: skip
            table_spec(
                loop,
                "eval_details",
                "evaluate",
                deps=["checkpoint", "prompts"],
                description="One row per held-out prompt: greedy answer, correct, pass@k.",
            ),  # fmt: skip
        ],
    )
    def eval_scores(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        step = loop.step(context)
        s, store = step.settings, step.store
        scores = score_round(
            store,
            step.round,
            s.method.recipe(),
            scoring_plan(step.round, s),
            load_engine=lambda ref: s.generator.load(ref, store.models_dir),
            log=step.log,
        )
        version = step.save("eval_scores", scores.tables())
        # promoted_policy and history are assets of their own (assets/policy.py).
        step.log(f"{step.round}: held-out accuracy {scores.before:.1%} -> {scores.after:.1%}")
        yield from step.side_results(version, "eval_details")
        yield step.result(
            version,
            "eval_scores",
            {
                **{k: v for k, v in scores.row.items() if v is not None and k != "round"},
                "accuracy_delta": scores.after - scores.before,
                **judge_metadata(store.read(step.round, "prompts")),  # code: the sandbox
                **parent_metadata(*store.generation_policy(step.round)),
            },
        )

    return eval_scores
