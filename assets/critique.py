"""The critique and filter stages of a round: every generation's `critiques` (with the
Self-Refine `refinements`) and the round's training set, `filtered`.

    critiques  -> methods.recipe.critique_round
    filtered   -> methods.recipe.select_training_set
"""

from collections.abc import Iterator

import dagster as dg

from assets.partitions import ROUNDS
from assets.tables import (
    ROUND_KINDS,
    preview,
    save,
    side_results,
    table_metadata,
    table_result,
    table_spec,
)
from resources import GeneratorResource, MethodResource, StorageResource, TrainerResource
from selfimprove_dagster.methods import recipe as methods
from selfimprove_dagster.profiles import MODEL_POOL
from selfimprove_dagster.quality import monitors
from selfimprove_dagster.store.storage import round_index


@dg.multi_asset(
    name="critiques",
    partitions_def=ROUNDS,
    pool=MODEL_POOL,  # the judge / refiner load the policy
    specs=[
        # The refiner's verdicts on the refined answers are critiques rows too.
        table_spec("critiques", "critique", deps=["generations", "prompts", "refinements"]),
        table_spec(
            "refinements",
            "critique",
            deps=["generations", "prompts"],
            skippable=True,
            description="Self-Refine: each refined answer, its feedback and the sample it rewrote.",
        ),
    ],
)
def critiques(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    generator: GeneratorResource,
    method: MethodResource,
) -> Iterator[dg.MaterializeResult]:
    """Every generation's critique by the round's critic (`method`): the verifier
    (star), the majority vote (self_consistency) or the policy as judge (self_judge);
    with self_refine, also one row per refined answer (critic `refiner`), and the
    refined answers with their feedback in table `refinements`.

    Columns: round, generation_id, prompt_id, critic, verdict (accept/reject), correct
    (ground truth, where there is one), extracted_answer, reference_answer, reason,
    score (0-1), critique (text); self_consistency adds pseudo_label, agreement;
    self_judge adds judge_points, judge_replies, judge_parsed.
    """
    store, round_ = storage.store(), context.partition_key
    recipe = method.recipe()
    policy, _ = store.generation_policy(round_)
    result = methods.critique_round(
        recipe,
        store.read(round_, "generations"),
        store.read(round_, "prompts"),
        load_policy=lambda: generator.load(policy, store.models_dir),
        sampling=generator.sampling(round_index(round_)),
        settings=method.settings(),
        log=context.log.info,
        # With rationale, a sample cut off before its final answer has none.
        answer_format=generator.answer_format,
    )
    frame = result.critiques
    version = save(
        context, store, "critiques", {"critiques": frame, "refinements": result.refinements}
    )
    yield from side_results(version, "refinements")
    yield table_result(
        version,
        "critiques",
        {
            "method": recipe.name,
            "critics": ", ".join(frame["critic"].unique(maintain_order=True)),
            **monitors.critique_rates(frame),
            **{k: v for k, v in methods.method_metrics(recipe, frame).items() if v is not None},
            "preview": preview(frame, ["critic", "verdict", "reason", "score", "critique"]),
        },
    )


@dg.asset(
    partitions_def=ROUNDS,
    group_name="filter",
    kinds=ROUND_KINDS,
    # Not `refinements`: it is skippable, and a skipped upstream skips this step.
    deps=["critiques", "generations"],
    metadata=table_metadata("filtered"),
)
def filtered(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    trainer: TrainerResource,
    method: MethodResource,
) -> dg.MaterializeResult:
    """The training set of the round: accepted answers (generated, and refined with
    self_refine), deduplicated per prompt and capped at `max_per_prompt` per prompt;
    with self_judge, one preference pair per prompt (best vs worst judged answer);
    with grpo/rloo, the prompts the RL trainer trains on.

    Columns: round, generation_id, prompt_id, prompt, completion, source
    (generated/refined); pairs add rejected_generation_id, rejected_completion,
    chosen_score, rejected_score, margin.
    """
    store, round_ = storage.store(), context.partition_key
    recipe = method.recipe()
    generated = store.read(round_, "generations")
    frame = methods.select_round_training_set(
        recipe,
        store,
        round_,
        trainer.max_per_prompt,
        method.settings(trainer.rl_steps * trainer.rl_prompts_per_step, trainer.seed),
        use_refinements=recipe.refine or method.rationalize,
    )
    version = save(context, store, "filtered", {"filtered": frame})
    if recipe.online:  # the rows are prompts to train on, not SFT targets: say so
        context.log.info(f"{round_}: {recipe.name}: filtered holds the RL prompts")
    return table_result(
        version,
        "filtered",
        {
            "method": recipe.name,
            "objective": recipe.objective,
            **methods.selection_figures(frame, generated),
            "max_per_prompt": trainer.max_per_prompt,
        },
    )
