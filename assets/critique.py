"""The critique and filter stages of a round: every generation's `critiques` (with the
Self-Refine `refinements`) and the round's training set, `filtered`.

    critiques  -> methods.recipe.critique_round
    filtered   -> methods.recipe.select_round_training_set
"""

from collections.abc import Iterator

import dagster as dg

from selfimprove_dagster.assets.loop import Loop
from selfimprove_dagster.assets.tables import preview, table_spec
from selfimprove_dagster.methods import recipe as methods
from selfimprove_dagster.profiles import MODEL_POOL
from selfimprove_dagster.quality import monitors
from selfimprove_dagster.store.storage import round_index
from selfimprove_dagster.verifiers.code import judge_metadata

CRITIQUES_DOC = """Every generation's critique by the round's critic (`method`): the
verifier (star), the majority vote (self_consistency) or the policy as judge
(self_judge); with self_refine, also one row per refined answer (critic `refiner`), and
the refined answers with their feedback in table `refinements`.

Columns: round, generation_id, prompt_id, critic, verdict (accept/reject), correct
(ground truth, where there is one), extracted_answer, reference_answer, reason, score
(0-1), critique (text); self_consistency adds pseudo_label, agreement; self_judge adds
judge_points, judge_replies, judge_parsed."""

FILTERED_DOC = """The training set of the round: accepted answers (generated, and refined
with self_refine), deduplicated per prompt and capped at `max_per_prompt` per prompt;
with self_judge, one preference pair per prompt (best vs worst judged answer); with
grpo/rloo, the prompts the RL trainer trains on.

Columns: round, generation_id, prompt_id, prompt, completion, source
(generated/refined); pairs add rejected_generation_id, rejected_completion,
chosen_score, rejected_score, margin."""


def critiques_asset(loop: Loop) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=f"{loop.name}_critiques",
        partitions_def=loop.partitions,
        pool=MODEL_POOL,  # the judge / refiner load the policy
        required_resource_keys=loop.resource_keys(),
        specs=[
            # The refiner's verdicts on the refined answers are critiques rows too.
            table_spec(
                loop,
                "critiques",
                "critique",
                deps=["generations", "prompts", "refinements"],
                description=CRITIQUES_DOC,
            ),  # fmt: skip
            table_spec(
                loop,
                "refinements",
                "critique",
                deps=["generations", "prompts"],
                skippable=True,
                description="Self-Refine: each refined answer, its feedback and the sample "
                "it rewrote.",
            ),  # fmt: skip
        ],
    )
    def critiques(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        step = loop.step(context)
        s = step.settings
        recipe = s.method.recipe()
        policy, _ = step.store.generation_policy(step.round)
        result = methods.critique_round(
            recipe,
            step.store.read(step.round, "generations"),
            step.store.read(step.round, "prompts"),
            load_policy=lambda: s.generator.load(policy, step.store.models_dir),
            sampling=s.generator.sampling(round_index(step.round)),
            settings=s.method.settings(),
            log=step.log,
            # With rationale, a sample cut off before its final answer has none.
            answer_format=s.generator.answer_format,
        )
        frame = result.critiques
        version = step.save("critiques", {"critiques": frame, "refinements": result.refinements})
        yield from step.side_results(version, "refinements")
        yield step.result(
            version,
            "critiques",
            {
                "method": recipe.name,
                "critics": ", ".join(frame["critic"].unique(maintain_order=True)),
                **monitors.critique_rates(frame),
                **judge_metadata(step.store.read(step.round, "prompts")),  # code: the sandbox
                **{k: v for k, v in methods.method_metrics(recipe, frame).items() if v is not None},
                "preview": preview(frame, ["critic", "verdict", "reason", "score", "critique"]),
            },
        )

    return critiques


def filtered_asset(loop: Loop) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=f"{loop.name}_filtered",
        partitions_def=loop.partitions,
        required_resource_keys=loop.resource_keys(),
        specs=[
            # Not `refinements`: it is skippable, and a skipped upstream skips this step.
            table_spec(
                loop,
                "filtered",
                "filter",
                deps=["critiques", "generations"],
                description=FILTERED_DOC,
            ),  # fmt: skip
        ],
    )
    def filtered(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        step = loop.step(context)
        s = step.settings
        recipe = s.method.recipe()
        frame = methods.select_round_training_set(
            recipe,
            step.store,
            step.round,
            s.trainer.max_per_prompt,
            s.method.settings(s.trainer.rl_steps * s.trainer.rl_prompts_per_step, s.trainer.seed),
            use_refinements=recipe.refine or s.method.rationalize,
        )
        version = step.save("filtered", {"filtered": frame})
        if recipe.online:  # the rows are prompts to train on, not SFT targets: say so
            step.log(f"{step.round}: {recipe.name}: filtered holds the RL prompts")
        generated = step.store.read(step.round, "generations")
        yield step.result(
            version,
            "filtered",
            {
                "method": recipe.name,
                "objective": recipe.objective,
                **methods.selection_figures(frame, generated),
                "max_per_prompt": s.trainer.max_per_prompt,
            },
        )

    return filtered
