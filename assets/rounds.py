"""The six assets of a self-improvement round (one partition per round).

    prompts -> generations -> critiques -> filtered -> checkpoint -> eval_scores

Each body loads its inputs from the round store, calls one core function
(`selfimprove_dagster.methods.star`, `.training`, `.evaluation`) and returns metadata.
Round N's policy is round N−1's checkpoint, or the best one so far with
`SELFIMPROVE_POLICY=best` (`evolution.round_policy`); `checkpoint` and `eval_scores`
read it back from the round's `generations`, so the three always agree.
"""

import time
from collections.abc import Iterator
from dataclasses import replace

import dagster as dg
import polars as pl

from assets.partitions import ROUNDS
from assets.sensors import check_round_order
from resources import (
    EvolutionResource,
    GatesResource,
    GeneratorResource,
    MethodResource,
    StorageResource,
    TaskResource,
    TrainerResource,
)
from selfimprove_dagster.engines import GenerationEngine
from selfimprove_dagster.evaluation import (
    EvalResult,
    evaluate_policy,
    previous_accuracy,
)
from selfimprove_dagster.evolution import (
    round_policy,
    round_temperature,
    tune_next_temperature,
)
from selfimprove_dagster.methods import consistency, grpo, star
from selfimprove_dagster.methods import recipe as methods
from selfimprove_dagster.models import model_ref_identity
from selfimprove_dagster.profiles import MODEL_POOL
from selfimprove_dagster.quality import monitors
from selfimprove_dagster.sources import curriculum, synthesis
from selfimprove_dagster.sources import mix as prompt_sources
from selfimprove_dagster.store import schemas
from selfimprove_dagster.store.storage import RoundStore, round_index
from selfimprove_dagster.store.versions import TableVersion
from selfimprove_dagster.training import train_lora

ROUND_KINDS = {"python", "parquet"}


def _save(
    context: dg.AssetExecutionContext,
    store: RoundStore,
    step: str,
    frames: dict[str, pl.DataFrame | None],
) -> TableVersion:
    """Publish the step's tables as one new version of the round (a None frame: not
    written this time, so that table is no longer current) and refresh the catalog."""
    if not isinstance(frames, dict):
        raise TypeError(
            "_save publishes a step's tables: _save(context, store, step, {table: frame})"
        )
    written = {table: frame for table, frame in frames.items() if frame is not None}
    version = store.publish(context.partition_key, step, written, run_id=context.run_id)
    context.log.info(
        f"{context.partition_key}: {step} version {version.version}: {', '.join(written)}"
    )
    context.log.info(store.refresh_catalog())
    return version


def table_schema(table: str) -> dg.TableSchema:
    """The declared columns of a round table (`store.schemas`, shared with the GE suites)."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(c.name, c.type, description=c.description or None)
            for c in schemas.columns(table)
        ]
    )


def _table_spec(table: str, group: str, deps=(), skippable: bool = False, **kwargs):
    """A round table as an asset of a multi-asset step: its columns and its DuckDB view."""
    return dg.AssetSpec(
        table,
        deps=list(deps),
        skippable=skippable,
        group_name=group,
        kinds=kwargs.pop("kinds", ROUND_KINDS),
        description=kwargs.pop("description", None),
        metadata={"dagster/column_schema": table_schema(table), "dagster/table_name": table},
        **kwargs,
    )


def _table_result(
    version: TableVersion, table: str, metadata: dict | None = None
) -> dg.MaterializeResult:
    """A table's materialization: row count, DuckDB view, Parquet location of the
    current version, column schema, and its content hash as the Dagster data version
    (downstream assets of the round show stale only when the content changed)."""
    return dg.MaterializeResult(
        asset_key=table,
        metadata={
            "dagster/row_count": version.row_counts[table],
            "dagster/table_name": table,
            "dagster/uri": str(version.path(table).resolve()),
            "dagster/column_schema": table_schema(table),
            "version": version.version,
            **(metadata or {}),
        },
        data_version=dg.DataVersion(version.table_hashes[table]),
    )


def _side_results(version: TableVersion, *tables: str) -> Iterator[dg.MaterializeResult]:
    """Results for those of `tables` written in `version` (a skipped one: none). A multi
    asset yields in lineage order: a step's upstream tables before their dependents."""
    for table in tables:
        if table in version.tables:
            yield _table_result(version, table)


def _preview(frame: pl.DataFrame, columns: list[str], rows: int = 5) -> dg.MetadataValue:
    return dg.MetadataValue.md(frame.select(columns).head(rows).to_pandas().to_markdown())


@dg.multi_asset(
    name="prompts",
    partitions_def=ROUNDS,
    pool=MODEL_POOL,  # Self-Instruct / curriculum load the policy
    specs=[
        # The kept Self-Instruct candidates and the curriculum's chosen band make prompts.
        _table_spec("prompts", "generate", deps=["prompt_candidates", "curriculum_measure"]),
        _table_spec(
            "prompt_mix",
            "generate",
            deps=["prompts"],
            description="One row per prompt source: weight, rows asked and given.",
        ),
        _table_spec(
            "prompt_candidates",
            "generate",
            skippable=True,
            description="Every proposed prompt the round did not simply take: Self-Instruct "
            "candidates, kept or dropped (why); dataset train rows dropped as contaminated "
            "(drop_reason `contaminated`, with the eval prompt each matched).",
        ),
        _table_spec(
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
    plan = task.plan(generator.max_new_tokens, gates.near_duplicate_threshold)
    dropped: list[dict] = []  # dataset train rows dropped as contaminated (recorded below)
    if task.drop_contaminated:
        plan = replace(plan, load_problems=task.problem_loader(dropped))

    def load_policy() -> GenerationEngine:
        policy, _ = round_policy(store, round_, generator.base_model, evolution.policy)
        context.log.info(f"{round_}: prompts stage loads the round's policy {policy}")
        return generator.load(policy, store.models_dir)

    result = prompt_sources.round_prompts(
        plan,
        store,
        round_,
        load_policy,
        context.log.info,
        sampling=generator.sampling(round_index(round_)),
    )
    # Task types the round's method or sources cannot handle stop here, before sampling.
    curriculum.check_mix(result.prompts)
    if recipe.critic == "self_consistency":
        consistency.check_votable(star.train_prompts(result.prompts))
    candidates = result.candidates
    if dropped:  # nothing hidden: each dropped row, with the eval prompt it matched
        drops = synthesis.contamination_candidates(round_, dropped)
        candidates = (
            drops if candidates is None else pl.concat([candidates, drops], how="diagonal_relaxed")
        )
    version = _save(
        context,
        store,
        "prompts",
        {
            "prompts": result.prompts,
            prompt_sources.MIX_TABLE: result.mix,
            prompt_sources.MEASURE_TABLE: result.measurements,
            prompt_sources.CANDIDATES_TABLE: candidates,
        },
    )
    extra: dict = {"contaminated_dropped": len(dropped)}
    if dropped:
        extra["contaminated_preview"] = _preview(
            pl.DataFrame(dropped).select(pl.all().cast(pl.String)),
            ["prompt", "eval_prompt", "match", "similarity"],
            rows=10,
        )
    if result.candidates is not None:
        synthesized = result.candidates.filter(~pl.col("kept"))
        extra["dropped_preview"] = _preview(
            synthesized, ["instruction", "drop_reason", "drop_detail"], rows=10
        )
    for line in prompt_sources.describe(result):
        context.log.info(f"{round_}: {line}")
    yield from _side_results(version, prompt_sources.CANDIDATES_TABLE, prompt_sources.MEASURE_TABLE)
    yield _table_result(
        version,
        "prompts",
        {
            **prompt_sources.summary(result),
            "preview": _preview(result.prompts, ["prompt", "answer", "split", "source"]),
            **extra,
        },
    )
    yield from _side_results(version, prompt_sources.MIX_TABLE)


@dg.asset(
    partitions_def=ROUNDS,
    pool=MODEL_POOL,
    group_name="generate",
    kinds=ROUND_KINDS | {"pytorch"},
    deps=["prompts"],
    metadata={
        "dagster/column_schema": table_schema("generations"),
        "dagster/table_name": "generations",
    },
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
    policy, parent = round_policy(store, round_, generator.base_model, evolution.policy)
    temperature, temperature_reason = round_temperature(
        store, round_, generator.temperature, evolution.auto_temperature
    )
    context.log.info(f"{round_}: policy {policy}; {temperature_reason}")
    with generator.running(policy, store.models_dir) as engine:  # kept: see keep_engine
        frame = star.sample_generations(
            engine,
            store.read(round_, "prompts"),
            round_,
            generator.samples_per_prompt,
            replace(generator.sampling(round_index(round_)), temperature=temperature),
            log=context.log.info,
        )
    version = _save(context, store, "generations", {"generations": frame})
    return _table_result(
        version,
        "generations",
        {
            "policy_checkpoint": policy,
            "parent_round": parent or "none (base model)",
            "policy_mode": evolution.policy,
            "samples_per_prompt": generator.samples_per_prompt,
            "temperature": temperature,
            "temperature_reason": temperature_reason,
            "tokens_per_second": round(engine.last_stats.get("tokens_per_s", 0.0), 1),
            "generation_seconds": round(engine.last_stats.get("seconds", 0.0), 1),
            "mean_completion_tokens": float(frame["completion_tokens"].mean() or 0.0),
            "hit_length_limit_rate": float((frame["finish_reason"] == "length").mean() or 0.0),
            "preview": _preview(frame, ["prompt", "completion", "finish_reason"]),
        },
    )


@dg.multi_asset(
    name="critiques",
    partitions_def=ROUNDS,
    pool=MODEL_POOL,  # the judge / refiner load the policy
    specs=[
        # The refiner's verdicts on the refined answers are critiques rows too.
        _table_spec("critiques", "critique", deps=["generations", "prompts", "refinements"]),
        _table_spec(
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
        # The prompts' format (SELFIMPROVE_ANSWER_FORMAT sets the generator's and the
        # task's): with rationale, a sample cut off before its final answer has none.
        answer_format=generator.answer_format,
    )
    frame = result.critiques
    version = _save(
        context, store, "critiques", {"critiques": frame, "refinements": result.refinements}
    )
    yield from _side_results(version, "refinements")
    yield _table_result(
        version,
        "critiques",
        {
            "method": recipe.name,
            "critics": ", ".join(frame["critic"].unique(maintain_order=True)),
            **monitors.critique_rates(frame),
            **{k: v for k, v in methods.method_metrics(recipe, frame).items() if v is not None},
            "preview": _preview(frame, ["critic", "verdict", "reason", "score", "critique"]),
        },
    )


@dg.asset(
    partitions_def=ROUNDS,
    group_name="filter",
    kinds=ROUND_KINDS,
    # Not `refinements`: it is skippable, and a skipped upstream skips this step.
    deps=["critiques", "generations"],
    metadata={"dagster/column_schema": table_schema("filtered"), "dagster/table_name": "filtered"},
)
def filtered(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    trainer: TrainerResource,
    method: MethodResource,
) -> dg.MaterializeResult:
    """The training set of the round: accepted answers (generated, and refined with
    self_refine), deduplicated per prompt and capped at `max_per_prompt` per prompt;
    with self_judge, one preference pair per prompt (best vs worst judged answer).

    Columns: round, generation_id, prompt_id, prompt, completion, source
    (generated/refined); pairs add rejected_generation_id, rejected_completion,
    chosen_score, rejected_score, margin.
    """
    store, round_ = storage.store(), context.partition_key
    recipe = method.recipe()
    generated = store.read(round_, "generations")
    frame = methods.select_training_set(
        recipe,
        generated,
        store.read(round_, "critiques"),
        store.read(round_, "refinements")
        if (recipe.refine or method.rationalize) and store.has(round_, "refinements")
        else None,
        trainer.max_per_prompt,
        method.settings(trainer.rl_steps * trainer.rl_prompts_per_step, trainer.seed),
    )
    version = _save(context, store, "filtered", {"filtered": frame})
    if recipe.online:  # the rows are prompts to train on, not SFT targets: say so
        context.log.info(f"{round_}: {recipe.name}: filtered holds the RL prompts")
    n_prompts = generated["prompt_id"].n_unique()
    return _table_result(
        version,
        "filtered",
        {
            "method": recipe.name,
            "objective": recipe.objective,
            "kept_fraction": frame.height / max(generated.height, 1),
            "prompts_covered": frame["prompt_id"].n_unique(),
            "prompt_coverage": frame["prompt_id"].n_unique() / max(n_prompts, 1),
            "refined_rows": int((frame["source"] == "refined").sum()),
            "rationalized_rows": int((frame["source"] == "rationalized").sum()),
            "max_per_prompt": trainer.max_per_prompt,
            "content_hash": methods.filtered_content_hash(frame),
        },
    )


@dg.multi_asset(
    name="checkpoint",
    partitions_def=ROUNDS,
    pool=MODEL_POOL,
    specs=[
        dg.AssetSpec(
            "checkpoint",
            deps=["filtered"],
            group_name="train",
            kinds={"pytorch", "python"},
        ),
        _table_spec(
            "checkpoints",
            "train",
            deps=["checkpoint"],
            description="One row: the checkpoint's path, version, adapter hash, parent, "
            "the filtered data version it trained on, steps and loss.",
        ),
        _table_spec(
            "rollouts",
            "train",
            deps=["checkpoint"],
            skippable=True,
            description="grpo/rloo: every rollout the RL trainer sampled.",
        ),
        _table_spec(
            "rl_steps",
            "train",
            deps=["checkpoint"],
            skippable=True,
            description="grpo/rloo: one row per optimizer step (RL health figures).",
        ),
    ],
)
def checkpoint(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    generator: GeneratorResource,
    trainer: TrainerResource,
    method: MethodResource,
) -> Iterator[dg.MaterializeResult]:
    """The round's LoRA adapter trained on `filtered`: TRL SFT (completion-only loss),
    or TRL DPO on the preference pairs with self_judge (reference = the round's policy);
    with a manifest: objective, base model, parent checkpoint, filtered-set hash,
    hyper-parameters, seed, library versions, final loss and optimizer steps. With
    grpo/rloo: online RL (TRL) on the `filtered` prompts with the verifier as reward;
    every rollout to table `rollouts`, per-step health to `rl_steps` (methods/grpo.py).

    The adapter is published as a new version folder behind `checkpoints/<round>`; its
    manifest names its adapter, parent and data by content (verified on every load).
    Table `checkpoints` (one row): round, path, version, adapter_sha256, trained_from,
    policy, content_hash, filtered_data_version, train_examples, optimizer_steps,
    planned_steps, final_loss.
    """
    store, round_ = storage.store(), context.partition_key
    policy, parent = store.generation_policy(round_)
    trained_from = trainer.trained_from(policy, generator.base_model)
    frame = store.read(round_, "filtered")
    out_dir = store.checkpoint_dir(round_)
    recipe = method.recipe()
    # Training needs the memory (or the GPU) a kept generation engine holds; and the
    # checkpoint about to be written must not be served from a stale engine.
    generator.release_engine()
    rl = trainer.rl_params(generator.answer_format)
    recorder = grpo.RolloutRecorder(round_, trained_from, rl)
    manifest = train_lora(
        recipe.objective,
        trained_from,
        methods.training_examples(recipe, frame, store.read(round_, "prompts")),
        trainer.params(recipe.objective, generator.answer_format),
        out_dir,
        store.models_dir,
        manifest_extra={
            "round": round_,
            "base_model": generator.base_model,
            "policy": policy,
            "parent_round": parent,
            "init": trainer.init,
            "method": recipe.name,
            "filtered_content_hash": methods.filtered_content_hash(frame),
            # Identity, verified whenever the checkpoint loads (models.checkpoint_problem).
            "filtered_data_version": store.data_version(round_, "filtered"),
            "policy_identity": model_ref_identity(policy, store.models_dir),
        },
        log=context.log.info,
        after_train=recorder.collect if recipe.online else None,
    )
    row = {
        "round": round_,
        "path": str(out_dir),
        "version": manifest["version"],
        "adapter_sha256": manifest["adapter_sha256"],
        "trained_from": manifest["trained_from"],
        "policy": policy,
        "content_hash": manifest["filtered_content_hash"],
        "filtered_data_version": manifest["filtered_data_version"],
        "train_examples": manifest["train_examples"],
        "optimizer_steps": manifest["optimizer_steps"],
        "planned_steps": manifest["planned_steps"],
        "final_loss": manifest["final_loss"],
    }
    online = recipe.online  # every rollout is data: see methods/grpo.py
    version = _save(
        context,
        store,
        "checkpoint",
        {
            "checkpoints": pl.DataFrame([row]),
            grpo.ROLLOUTS_TABLE: recorder.rollouts if online else None,
            grpo.STEPS_TABLE: recorder.steps if online else None,
        },
    )
    yield dg.MaterializeResult(
        asset_key="checkpoint",
        # The adapter's content hash: re-training to the same weights is not a change.
        data_version=dg.DataVersion(manifest["adapter_sha256"]),
        metadata={
            "path": str(out_dir),
            "dagster/uri": str(store.checkpoint_version_dir(round_)),
            "version": manifest["version"],
            "adapter_sha256": manifest["adapter_sha256"],
            "trained_from": manifest["trained_from"],
            "policy_checkpoint": policy,
            "parent_round": parent or "none (base model)",
            "method": recipe.name,
            "objective": recipe.objective,
            "train_examples": manifest["train_examples"],
            "optimizer_steps": manifest["optimizer_steps"],
            "planned_steps": manifest["planned_steps"],
            "final_loss": manifest["final_loss"],
            "train_seconds": manifest["train_seconds"],
            "filtered_content_hash": manifest["filtered_content_hash"],
            **{k: v for k, v in manifest.get("rl", {}).items() if v is not None},
        },
    )
    yield _table_result(version, "checkpoints")
    yield from _side_results(version, grpo.ROLLOUTS_TABLE, grpo.STEPS_TABLE)


@dg.multi_asset(
    name="eval_scores",
    partitions_def=ROUNDS,
    pool=MODEL_POOL,
    specs=[
        # The round's monitors read its generations, critiques and filtered rows.
        _table_spec(
            "eval_scores",
            "evaluate",
            deps=["eval_details", "checkpoint", "generations", "critiques", "filtered"],
            kinds=ROUND_KINDS | {"pytorch"},
        ),
        _table_spec(
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
    balance_score, method and its figures (`methods.METRIC_COLUMNS`: pseudo-label
    precision/recall, judge accuracy and unparseable replies, pairs, refinements
    repaired/broken; null where the method has none), next_temperature,
    next_temperature_reason (with auto_temperature), eval_seconds. Per-prompt rows go
    to table `eval_details`.
    """
    store, round_ = storage.store(), context.partition_key
    policy, parent = store.generation_policy(round_)
    eval_set = star.eval_prompts(store.read(round_, "prompts"))
    sampling = generator.sampling(round_index(round_))
    started = time.monotonic()

    def score(engine: GenerationEngine, k: int) -> EvalResult:
        return evaluate_policy(
            engine,
            eval_set,
            max_new_tokens=generator.max_new_tokens,
            k=k,
            sampling=sampling,
            pass_at_k_prompts=task.pass_at_k_prompts,
            log=context.log.info,
            answer_format=generator.answer_format,  # as in `critiques`
        )

    before = previous_accuracy(store, parent, eval_set)
    if before is None:  # round 0, or the held-out set changed: measure the policy now
        context.log.info(f"{round_}: scoring the policy {policy} on the held-out set")
        policy_engine = generator.load(policy, store.models_dir)
        try:
            before = score(policy_engine, 0).accuracy
        finally:
            policy_engine.close()
    # The checkpoint last: with keep_engine, it stays loaded for the next round's policy.
    engine = generator.load(str(store.checkpoint_dir(round_)), store.models_dir)
    try:
        after = score(engine, task.eval_samples_per_prompt)
        tuning = (
            tune_next_temperature(
                engine,
                store,
                round_,
                k=generator.samples_per_prompt,
                sampling=sampling,
                grid=evolution.temperature_grid,
                max_per_prompt=trainer.max_per_prompt,
                tuning_prompts=evolution.tuning_prompts,
                log=context.log.info,
            )
            if evolution.auto_temperature
            else {}
        )
    finally:
        engine.close()
    row = {
        "round": round_,
        "checkpoint": str(store.checkpoint_dir(round_)),
        "policy": policy,
        "accuracy_before": before,
        "accuracy_after": after.accuracy,
        "pass_at_k": after.pass_at_k,
        "k": after.k,
        "n_eval": eval_set.height,
        **monitors.round_health(
            store.read(round_, "generations"),
            store.read(round_, "critiques"),
            store.read(round_, "filtered"),
            k=generator.samples_per_prompt,
            target=trainer.max_per_prompt,
        ),
        **methods.method_metrics(
            method.recipe(), store.read(round_, "critiques"), store.read(round_, "filtered")
        ),
        **grpo.round_health(store, round_, method.recipe().online),
        **tuning,
        "eval_seconds": round(time.monotonic() - started, 1),
    }
    version = _save(
        context,
        store,
        "eval_scores",
        {
            "eval_scores": pl.DataFrame([row]),
            "eval_details": after.details.with_columns(round=pl.lit(round_)),
        },
    )
    # promoted_policy and history are assets of their own (assets/policy.py).
    context.log.info(f"{round_}: held-out accuracy {before:.1%} -> {after.accuracy:.1%}")
    yield from _side_results(version, "eval_details")
    yield _table_result(
        version,
        "eval_scores",
        {
            **{k: v for k, v in row.items() if v is not None and k != "round"},
            "accuracy_delta": after.accuracy - before,
            "policy_checkpoint": policy,
            "parent_round": parent or "none (base model)",
        },
    )
