"""The generate stage of a round: its `prompts` (with the prompt mix, the Self-Instruct
candidates and the curriculum's measurements) and its `generations`.

    prompts      -> sources.mix.round_prompts
    generations  -> methods.star.sample_generations
"""

from collections.abc import Iterator
from dataclasses import replace

import dagster as dg
import polars as pl

from selfimprove_dagster.assets.loop import Loop, Step
from selfimprove_dagster.assets.record import check_round_order, recorded_done_rounds
from selfimprove_dagster.assets.tables import ROUND_KINDS, parent_metadata, preview, table_spec
from selfimprove_dagster.evolution import round_policy, round_temperature
from selfimprove_dagster.methods import recipe as methods
from selfimprove_dagster.methods import star
from selfimprove_dagster.profiles import MODEL_POOL
from selfimprove_dagster.sources import mix as prompt_sources
from selfimprove_dagster.store.storage import round_index

PROMPTS_DOC = """The round's problems from its prompt sources (`task.sources`: task, dataset,
curriculum, self_instruct, mixed by weight): train prompts (sampled from) and the fixed
held-out eval prompts (scored only, never trained on). Self-Instruct writes new prompts
with the round's policy, and the curriculum measures that policy's solve rate per band
(every sample to table `curriculum_measure`). Every synthesis candidate, kept or dropped
with its reason, and every dataset train row dropped as contaminated
(`drop_contaminated`, with the eval prompt it matched) go to table `prompt_candidates`;
one row per source to `prompt_mix`. A method or source mix the round's task types do not
support (self_consistency on code, the arithmetic curriculum beside a multiple-choice
dataset) fails here, before anything is sampled.

Columns: round, prompt_id, prompt, answer, split (train/eval), task, source, band, role
(curriculum: chosen/replay/probe), answer_source, answer_verified (False: a model-made
answer), origin_round, seed_ids, parent_prompt_ids, and what the row's verifier reads:
verifier, choices, tests, test_setup, entry_point."""


def round_policy_of(step: Step) -> tuple[str, str | None]:
    """The round's policy: round N−1's checkpoint, or with policy=best the promoted one
    among the rounds Dagster recorded as done."""
    s = step.settings
    done = recorded_done_rounds(step) if s.evolution.policy == "best" else []
    return round_policy(step.store, step.round, s.generator.base_model, s.evolution.policy, done)


def _prompts_metadata(result: prompt_sources.RoundPrompts) -> dict:
    extra: dict = {"preview": preview(result.prompts, ["prompt", "answer", "split", "source"])}
    if result.contaminated:
        extra["contaminated_preview"] = preview(
            pl.DataFrame(result.contaminated).select(pl.all().cast(pl.String)),
            ["prompt", "eval_prompt", "match", "similarity"],
            rows=10,
        )
    if result.candidates is not None:
        synthesized = result.candidates.filter(
            ~pl.col("kept") & (pl.col("source") == "self_instruct")
        )
        extra["dropped_preview"] = preview(
            synthesized, ["instruction", "drop_reason", "drop_detail"], rows=10
        )
    return {**prompt_sources.summary(result), **extra}


def prompts_asset(loop: Loop) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=f"{loop.name}_prompts",
        partitions_def=loop.partitions,
        pool=MODEL_POOL,  # Self-Instruct / curriculum load the policy
        required_resource_keys=loop.resource_keys(),
        specs=[
            # The kept Self-Instruct candidates and the curriculum's band make prompts.
            table_spec(
                loop,
                "prompts",
                "generate",
                deps=["prompt_candidates", "curriculum_measure"],
                description=PROMPTS_DOC,
            ),  # fmt: skip
            table_spec(
                loop,
                "prompt_mix",
                "generate",
                deps=["prompts"],
                description="One row per prompt source: weight, rows asked and given.",
            ),  # fmt: skip
            table_spec(
                loop,
                "prompt_candidates",
                "generate",
                skippable=True,
                description="Every proposed prompt the round did not simply take: "
                "Self-Instruct candidates, kept or dropped (why); dataset train rows "
                "dropped as contaminated (with the eval prompt each matched).",
            ),  # fmt: skip
            table_spec(
                loop,
                "curriculum_measure",
                "generate",
                skippable=True,
                description="Curriculum: the policy's answers per band (the band choice).",
            ),  # fmt: skip
        ],
    )
    def prompts(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        step = loop.step(context)
        s = step.settings
        check_round_order(step)  # a backfill builds each round on a done parent
        recipe = s.method.recipe()  # an unknown method fails here, before any sampling

        def load_policy():
            policy, _ = round_policy_of(step)
            step.log(f"{step.round}: prompts stage loads the round's policy {policy}")
            return s.generator.load(policy, step.store.models_dir)

        result = prompt_sources.round_prompts(
            s.task.plan(s.generator.max_new_tokens, s.gates.near_duplicate_threshold),
            step.store, step.round, load_policy, step.log,
            sampling=s.generator.sampling(round_index(step.round)),
        )  # fmt: skip
        methods.check_round_prompts(recipe, result.prompts)  # before anything is sampled
        version = step.save("prompts", result.tables())
        for line in prompt_sources.describe(result):
            step.log(f"{step.round}: {line}")
        yield from step.side_results(
            version, prompt_sources.CANDIDATES_TABLE, prompt_sources.MEASURE_TABLE
        )
        yield step.result(version, "prompts", _prompts_metadata(result))
        yield from step.side_results(version, prompt_sources.MIX_TABLE)

    return prompts


def generations_asset(loop: Loop) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=f"{loop.name}_generations",
        partitions_def=loop.partitions,
        pool=MODEL_POOL,
        required_resource_keys=loop.resource_keys(),
        specs=[
            table_spec(
                loop,
                "generations",
                "generate",
                deps=["prompts"],
                kinds=ROUND_KINDS | {"pytorch"},
                description="k sampled completions per train prompt from the round's "
                "policy: the promoted checkpoint so far (`policy=best`) or round N−1's "
                "(`policy=latest`); the base model in round 0. Columns: round, "
                "generation_id, prompt_id, sample_index, prompt, completion, prompt_tokens, "
                "completion_tokens, finish_reason, policy, temperature, top_p, top_k, "
                "max_new_tokens, seed.",
            ),  # fmt: skip
        ],
    )
    def generations(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        step = loop.step(context)
        s = step.settings
        policy, parent = round_policy_of(step)
        temperature, why = round_temperature(
            step.store, step.round, s.generator.temperature, s.evolution.auto_temperature
        )
        step.log(f"{step.round}: policy {policy}; {why}")
        sampling = replace(s.generator.sampling(round_index(step.round)), temperature=temperature)
        with s.generator.running(policy, step.store.models_dir) as engine:  # kept: keep_engine
            frame = star.sample_generations(
                engine, step.store.read(step.round, "prompts"), step.round,
                s.generator.samples_per_prompt, sampling, log=step.log,
            )  # fmt: skip
        version = step.save("generations", {"generations": frame})
        yield step.result(
            version,
            "generations",
            {
                **parent_metadata(policy, parent),
                "policy_mode": s.evolution.policy,
                "samples_per_prompt": s.generator.samples_per_prompt,
                "temperature": temperature,
                "temperature_reason": why,
                **star.generation_figures(frame, engine.last_stats),
                "preview": preview(frame, ["prompt", "completion", "finish_reason"]),
            },
        )

    return generations
