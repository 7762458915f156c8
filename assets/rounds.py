"""The six assets of a self-improvement round (one partition per round).

    prompts -> generations -> critiques -> filtered -> checkpoint -> eval_scores

Each body loads its inputs from the round store, calls one core function
(`selfimprove_dagster.methods.star`, `.training`, `.evaluation`) and returns metadata.
Round N's policy is round N−1's checkpoint, or the best one so far with
`SELFIMPROVE_POLICY=best` (`evolution.round_policy`); `checkpoint` and `eval_scores`
read it back from the round's `generations`, so the three always agree.
"""

import time
from dataclasses import replace

import dagster as dg
import polars as pl

from assets.partitions import ROUNDS
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
    balance_by_temperature,
    evaluate_policy,
    previous_accuracy,
)
from selfimprove_dagster.evolution import (
    choose_temperature_from_samples,
    promoted_round,
    round_policy,
    round_temperature,
)
from selfimprove_dagster.methods import recipe as methods
from selfimprove_dagster.methods import star
from selfimprove_dagster.plots import markdown_image, render_history
from selfimprove_dagster.quality import monitors
from selfimprove_dagster.sources import mix as prompt_sources
from selfimprove_dagster.store.storage import RoundStore, round_index
from selfimprove_dagster.training import train_lora

ROUND_KINDS = {"python", "parquet"}


def _save(context: dg.AssetExecutionContext, store: RoundStore, table: str, frame: pl.DataFrame):
    """Write the round's table atomically and make it queryable in the DuckDB catalog."""
    path = store.write(context.partition_key, table, frame)
    context.log.info(store.refresh_catalog())
    return path


def _preview(frame: pl.DataFrame, columns: list[str], rows: int = 5) -> dg.MetadataValue:
    return dg.MetadataValue.md(frame.select(columns).head(rows).to_pandas().to_markdown())


@dg.asset(partitions_def=ROUNDS, group_name="generate", kinds=ROUND_KINDS)
def prompts(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    task: TaskResource,
    generator: GeneratorResource,
    evolution: EvolutionResource,
    gates: GatesResource,
    method: MethodResource,
) -> dg.MaterializeResult:
    """The round's problems from its prompt sources (`task.sources`: task, dataset,
    curriculum, self_instruct, mixed by weight): train prompts (sampled from) and the
    fixed held-out eval prompts (scored only, never trained on). Self-Instruct writes
    new prompts with the round's policy, and the curriculum measures that policy's
    solve rate per band (every sample to table `curriculum_measure`). Every synthesis
    candidate, kept or dropped with its reason, goes to table `prompt_candidates`; one
    row per source to `prompt_mix`.

    Columns: round, prompt_id, prompt, answer, split (train/eval), task, source, band,
    role (curriculum: chosen/replay/probe), answer_source, answer_verified (False: a
    model-made answer), origin_round, seed_ids, parent_prompt_ids.
    """
    store, round_ = storage.store(), context.partition_key
    method.recipe()  # an unknown method fails here, before anything is sampled
    plan = task.plan(generator.max_new_tokens, gates.near_duplicate_threshold)

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
    path = _save(context, store, "prompts", result.prompts)
    _save(context, store, prompt_sources.MIX_TABLE, result.mix)
    extra = {}
    if result.measurements is not None:
        _save(context, store, prompt_sources.MEASURE_TABLE, result.measurements)
    if result.candidates is not None:
        _save(context, store, prompt_sources.CANDIDATES_TABLE, result.candidates)
        dropped = result.candidates.filter(~pl.col("kept"))
        extra["dropped_preview"] = _preview(
            dropped, ["instruction", "drop_reason", "drop_detail"], rows=10
        )
    for line in prompt_sources.describe(result):
        context.log.info(f"{round_}: {line}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.prompts.height,
            **prompt_sources.summary(result),
            "path": str(path),
            "preview": _preview(result.prompts, ["prompt", "answer", "split", "source"]),
            **extra,
        }
    )


@dg.asset(
    partitions_def=ROUNDS, group_name="generate", kinds=ROUND_KINDS | {"pytorch"}, deps=[prompts]
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
    path = _save(context, store, "generations", frame)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": frame.height,
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
            "path": str(path),
            "preview": _preview(frame, ["prompt", "completion", "finish_reason"]),
        }
    )


@dg.asset(partitions_def=ROUNDS, group_name="critique", kinds=ROUND_KINDS, deps=[generations])
def critiques(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    generator: GeneratorResource,
    method: MethodResource,
) -> dg.MaterializeResult:
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
    )
    frame = result.critiques
    if result.refinements is not None:
        _save(context, store, "refinements", result.refinements)
    path = _save(context, store, "critiques", frame)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": frame.height,
            "method": recipe.name,
            "critics": ", ".join(frame["critic"].unique(maintain_order=True)),
            **critique_rates(frame),
            **{k: v for k, v in methods.method_metrics(recipe, frame).items() if v is not None},
            "path": str(path),
            "preview": _preview(frame, ["critic", "verdict", "reason", "score", "critique"]),
        }
    )


def critique_rates(frame: pl.DataFrame) -> dict[str, float]:
    """Accept rate of the first critic, and ground-truth error rates where known."""
    first = frame.filter(pl.col("critic") == frame["critic"][0]) if frame.height else frame
    rates = {"accept_rate": float((first["verdict"] == "accept").mean() or 0.0)}
    if first["correct"].null_count() < first.height:
        rates["correct_rate"] = float(first["correct"].mean() or 0.0)
    rates["no_answer_rate"] = float(first["extracted_answer"].is_null().mean() or 0.0)
    return rates


@dg.asset(partitions_def=ROUNDS, group_name="filter", kinds=ROUND_KINDS, deps=[critiques])
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
        store.read(round_, "refinements") if recipe.refine else None,
        trainer.max_per_prompt,
        method.settings(),
    )
    path = _save(context, store, "filtered", frame)
    n_prompts = generated["prompt_id"].n_unique()
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": frame.height,
            "method": recipe.name,
            "objective": recipe.objective,
            "kept_fraction": frame.height / max(generated.height, 1),
            "prompts_covered": frame["prompt_id"].n_unique(),
            "prompt_coverage": frame["prompt_id"].n_unique() / max(n_prompts, 1),
            "refined_rows": int((frame["source"] == "refined").sum()),
            "max_per_prompt": trainer.max_per_prompt,
            "content_hash": methods.filtered_content_hash(frame),
            "path": str(path),
        }
    )


@dg.asset(partitions_def=ROUNDS, group_name="train", kinds={"pytorch", "python"}, deps=[filtered])
def checkpoint(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    generator: GeneratorResource,
    trainer: TrainerResource,
    method: MethodResource,
) -> dg.MaterializeResult:
    """The round's LoRA adapter trained on `filtered`: TRL SFT (completion-only loss),
    or TRL DPO on the preference pairs with self_judge (reference = the round's policy);
    with a manifest: objective, base model, parent checkpoint, filtered-set hash,
    hyper-parameters, seed, library versions, final loss and optimizer steps.

    Table `checkpoints` (one row): round, path, trained_from, policy, content_hash,
    train_examples, optimizer_steps, planned_steps, final_loss.
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
    manifest = train_lora(
        recipe.objective,
        trained_from,
        methods.training_examples(recipe, frame),
        trainer.params(recipe.objective),
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
        },
        log=context.log.info,
    )
    row = {
        "round": round_,
        "path": str(out_dir),
        "trained_from": manifest["trained_from"],
        "policy": policy,
        "content_hash": manifest["filtered_content_hash"],
        "train_examples": manifest["train_examples"],
        "optimizer_steps": manifest["optimizer_steps"],
        "planned_steps": manifest["planned_steps"],
        "final_loss": manifest["final_loss"],
    }
    _save(context, store, "checkpoints", pl.DataFrame([row]))
    return dg.MaterializeResult(
        metadata={
            "path": str(out_dir),
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
        }
    )


@dg.asset(
    partitions_def=ROUNDS, group_name="evaluate", kinds=ROUND_KINDS | {"pytorch"}, deps=[checkpoint]
)
def eval_scores(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    generator: GeneratorResource,
    task: TaskResource,
    trainer: TrainerResource,
    evolution: EvolutionResource,
    method: MethodResource,
) -> dg.MaterializeResult:
    """Held-out scores of the round's checkpoint (greedy accuracy, pass@k) next to the
    accuracy of the policy that generated the round (before -> after), with the round's
    B-STaR monitors and a plot of the history across rounds.

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
        tuning = tune_next_temperature(
            engine, store, round_, generator, trainer, evolution, context
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
        **round_health(store, round_, generator.samples_per_prompt, trainer.max_per_prompt),
        **methods.method_metrics(
            method.recipe(), store.read(round_, "critiques"), store.read(round_, "filtered")
        ),
        **tuning,
        "eval_seconds": round(time.monotonic() - started, 1),
    }
    _save(context, store, "eval_details", after.details.with_columns(round=pl.lit(round_)))
    _save(context, store, "eval_scores", pl.DataFrame([row]))
    history = store.history()
    promoted = record_promoted_policy(store, history)
    context.log.info(store.refresh_catalog())
    plot = render_history(history, store.data_dir / "plots" / "history.png")
    context.log.info(f"{round_}: held-out accuracy {before:.1%} -> {after.accuracy:.1%}")
    return dg.MaterializeResult(
        metadata={
            **{k: v for k, v in row.items() if v is not None and k != "round"},
            "accuracy_delta": after.accuracy - before,
            "policy_checkpoint": policy,
            "parent_round": parent or "none (base model)",
            "promoted_round": promoted or "none (every round regressed)",
            "history": dg.MetadataValue.md(markdown_image(plot)),
            "history_table": dg.MetadataValue.md(
                history.select(HISTORY_COLUMNS).to_pandas().to_markdown(index=False)
            ),
        }
    )


def tune_next_temperature(engine, store, round_, generator, trainer, evolution, context) -> dict:
    """With auto_temperature: the next round's temperature, B-STaR style (the grid
    temperature whose balance score is highest for the new checkpoint)."""
    if not evolution.auto_temperature:
        return {}
    train_set = star.train_prompts(store.read(round_, "prompts")).head(evolution.tuning_prompts)
    balance = balance_by_temperature(
        engine,
        train_set,
        round_,
        generator.samples_per_prompt,
        generator.sampling(round_index(round_)),
        evolution.temperature_grid,
        trainer.max_per_prompt,
        log=context.log.info,
    )
    current = float(store.read(round_, "generations")["temperature"][0])
    temperature, reason = choose_temperature_from_samples(balance, current=current)
    context.log.info(f"{round_}: next round's temperature: {reason}")
    return {"next_temperature": temperature, "next_temperature_reason": reason}


def record_promoted_policy(store: RoundStore, history: pl.DataFrame) -> str | None:
    """Point the `promoted_policy` record at the best non-regressed checkpoint so far."""
    promoted = promoted_round(history)
    if promoted is not None:
        best = history.filter(pl.col("round") == promoted).row(0, named=True)
        record = {
            "round": promoted,
            "checkpoint": best["checkpoint"],
            "accuracy": best["accuracy_after"],
            "decided_after": history["round"].max(),
        }
        store.write_promoted(pl.DataFrame([record]))
    return promoted


HISTORY_COLUMNS = ["round", "kept", "accuracy_before", "accuracy_after", "pass_at_k"]


def round_health(store: RoundStore, round_: str, k: int, target: int) -> dict:
    """Kept fraction and the B-STaR monitors of the round's train-prompt sampling."""
    generated, kept = store.read(round_, "generations"), store.read(round_, "filtered")
    health = monitors.round_monitors(
        generated, store.read(round_, "critiques"), kept, k=k, target=target
    )
    exploration = {f"train_{name}": health.pop(name) for name in monitors.EXPLORATION_COLUMNS}
    return {
        "kept": kept.height,
        "kept_fraction": kept.height / max(generated.height, 1),
        **exploration,
        **health,
    }
