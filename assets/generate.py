"""The generate stage of a round: its `prompts` (with the prompt mix, the Self-Instruct
candidates and the curriculum's measurements) and its `generations`.

    prompts      -> sources.mix.round_prompts
    generations  -> methods.star.sample_generations
"""

from collections.abc import Iterator
from dataclasses import replace

import dagster as dg
import polars as pl

from assets.partitions import ROUNDS
from assets.record import recorded_done_rounds
from assets.sensors import check_round_order
from assets.tables import (
    ROUND_KINDS,
    parent_metadata,
    preview,
    save,
    side_results,
    table_metadata,
    table_result,
    table_spec,
)
from resources import (
    EvolutionResource,
    GatesResource,
    GeneratorResource,
    MethodResource,
    StorageResource,
    TaskResource,
)
from selfimprove_dagster.evolution import round_policy, round_temperature
from selfimprove_dagster.methods import recipe as methods
from selfimprove_dagster.methods import star
from selfimprove_dagster.profiles import MODEL_POOL
from selfimprove_dagster.sources import mix as prompt_sources
from selfimprove_dagster.store.storage import round_index


def _round_policy(context, store, generator, evolution) -> tuple[str, str | None]:
    """The round's policy: round N−1's checkpoint, or with policy=best the promoted one
    among the rounds Dagster recorded as done."""
    done = recorded_done_rounds(context, store) if evolution.policy == "best" else []
    return round_policy(store, context.partition_key, generator.base_model, evolution.policy, done)


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


@dg.multi_asset(
    name="prompts",
    partitions_def=ROUNDS,
    pool=MODEL_POOL,  # Self-Instruct / curriculum load the policy
    specs=[
        # The kept Self-Instruct candidates and the curriculum's chosen band make prompts.
        table_spec("prompts", "generate", deps=["prompt_candidates", "curriculum_measure"]),
        table_spec(
            "prompt_mix",
            "generate",
            deps=["prompts"],
            description="One row per prompt source: weight, rows asked and given.",
        ),
        table_spec(
            "prompt_candidates",
            "generate",
            skippable=True,
            description="Every proposed prompt the round did not simply take: Self-Instruct "
            "candidates, kept or dropped (why); dataset train rows dropped as contaminated "
            "(drop_reason `contaminated`, with the eval prompt each matched).",
        ),
        table_spec(
            "curriculum_measure",
            "generate",
            skippable=True,
            description="Curriculum: the policy's answers per band (the band choice).",
        ),
    ],
)
def prompts(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    task: TaskResource,
    generator: GeneratorResource,
    evolution: EvolutionResource,
    gates: GatesResource,
    method: MethodResource,
) -> Iterator[dg.MaterializeResult]:
    """The round's problems from its prompt sources (`task.sources`: task, dataset,
    curriculum, self_instruct, mixed by weight): train prompts (sampled from) and the
    fixed held-out eval prompts (scored only, never trained on). Self-Instruct writes
    new prompts with the round's policy, and the curriculum measures that policy's
    solve rate per band (every sample to table `curriculum_measure`). Every synthesis
    candidate, kept or dropped with its reason, and every dataset train row dropped as
    contaminated (`drop_contaminated`, with the eval prompt it matched) go to table
    `prompt_candidates`; one row per source to `prompt_mix`. A method or source mix
    the round's task types do not support (self_consistency on code, the arithmetic
    curriculum beside a multiple-choice dataset) fails here, before anything is sampled.

    Columns: round, prompt_id, prompt, answer, split (train/eval), task, source, band,
    role (curriculum: chosen/replay/probe), answer_source, answer_verified (False: a
    model-made answer), origin_round, seed_ids, parent_prompt_ids, and what the row's
    verifier reads: verifier, choices, tests, test_setup, entry_point.
    """
    store, round_ = storage.store(), context.partition_key
    check_round_order(context)  # a backfill builds each round on a done parent
    recipe = method.recipe()  # an unknown method fails here, before anything is sampled

    def load_policy():
        policy, _ = _round_policy(context, store, generator, evolution)
        context.log.info(f"{round_}: prompts stage loads the round's policy {policy}")
        return generator.load(policy, store.models_dir)

    result = prompt_sources.round_prompts(
        task.plan(generator.max_new_tokens, gates.near_duplicate_threshold),
        store,
        round_,
        load_policy,
        context.log.info,
        sampling=generator.sampling(round_index(round_)),
    )
    methods.check_round_prompts(recipe, result.prompts)  # before anything is sampled
    version = save(context, store, "prompts", result.tables())
    for line in prompt_sources.describe(result):
        context.log.info(f"{round_}: {line}")
    yield from side_results(version, prompt_sources.CANDIDATES_TABLE, prompt_sources.MEASURE_TABLE)
    yield table_result(version, "prompts", _prompts_metadata(result))
    yield from side_results(version, prompt_sources.MIX_TABLE)


@dg.asset(
    partitions_def=ROUNDS,
    pool=MODEL_POOL,
    group_name="generate",
    kinds=ROUND_KINDS | {"pytorch"},
    deps=["prompts"],
    metadata=table_metadata("generations"),
)
def generations(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    generator: GeneratorResource,
    evolution: EvolutionResource,
) -> dg.MaterializeResult:
    """k sampled completions per train prompt from the round's policy: the promoted
    checkpoint so far (`policy=best`) or round N−1's (`policy=latest`); the base model
    in round 0. `parent_round` in the metadata is the round whose checkpoint it is.

    Columns: round, generation_id, prompt_id, sample_index, prompt, completion,
    prompt_tokens, completion_tokens, finish_reason, policy, temperature, top_p, top_k,
    max_new_tokens, seed.
    """
    store, round_ = storage.store(), context.partition_key
    policy, parent = _round_policy(context, store, generator, evolution)
    temperature, temperature_reason = round_temperature(
        store, round_, generator.temperature, evolution.auto_temperature
    )
    context.log.info(f"{round_}: policy {policy}; {temperature_reason}")
    sampling = replace(generator.sampling(round_index(round_)), temperature=temperature)
    with generator.running(policy, store.models_dir) as engine:  # kept: see keep_engine
        frame = star.sample_generations(
            engine, store.read(round_, "prompts"), round_, generator.samples_per_prompt,
            sampling, log=context.log.info,
        )  # fmt: skip
    version = save(context, store, "generations", {"generations": frame})
    return table_result(
        version,
        "generations",
        {
            **parent_metadata(policy, parent),
            "policy_mode": evolution.policy,
            "samples_per_prompt": generator.samples_per_prompt,
            "temperature": temperature,
            "temperature_reason": temperature_reason,
            **star.generation_figures(frame, engine.last_stats),
            "preview": preview(frame, ["prompt", "completion", "finish_reason"]),
        },
    )
