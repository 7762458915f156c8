"""Quality gates of a round. Blocking gates (severity ERROR) stop everything downstream
of the asset they check; health monitors WARN with their figures in metadata.

Check logic lives in the core (`selfimprove_dagster.quality`: `gates`, `expectations`,
`monitors`), as pure functions; these wrappers read the round's tables and convert.
"""

import warnings

import dagster as dg

from assets.partitions import ROUNDS
from resources import GatesResource, GeneratorResource, StorageResource, TaskResource
from selfimprove_dagster.engines.base import Sampling
from selfimprove_dagster.methods import star
from selfimprove_dagster.models import read_manifest
from selfimprove_dagster.quality import expectations, monitors, prompt_gates
from selfimprove_dagster.quality import gates as quality
from selfimprove_dagster.store.storage import previous_round

# Per-round check results need `partitions_def` on checks, a Dagster preview feature.
warnings.filterwarnings("ignore", category=dg.PreviewWarning, message=".*partitions_def.*")

ERROR, WARN = dg.AssetCheckSeverity.ERROR, dg.AssetCheckSeverity.WARN


def to_check_result(
    gate: quality.GateResult, severity: dg.AssetCheckSeverity = ERROR
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=gate.passed,
        severity=severity,
        description=gate.message,
        # Raw ints, floats, strings, lists and dicts become Dagster metadata values.
        metadata={"observed": gate.observed, "threshold": gate.threshold, **gate.details},
    )


def suite_check(asset: str, table: str, blocking: bool, optional: bool = False):
    """A Great Expectations suite (`expectations.SUITES[table]`) as a check of the table
    asset `asset` (each table is an asset; checks attach to the table they check).
    `optional`: a table only some rounds write (rollouts: online RL rounds) passes,
    saying so, in a round that did not write it."""

    @dg.asset_check(
        asset=asset,
        name=f"check_schema_{table}",
        blocking=blocking,
        partitions_def=ROUNDS,
        description=f"Great Expectations suite `{table}`: schema, nulls, value sets, ranges.",
    )
    def _check(
        context: dg.AssetCheckExecutionContext, storage: StorageResource
    ) -> dg.AssetCheckResult:
        store = storage.store()
        if optional and not store.has(context.partition_key, table):
            return dg.AssetCheckResult(
                passed=True,
                severity=ERROR if blocking else WARN,
                description=f"`{table}`: not written in this round (nothing to check)",
            )
        result = expectations.validate_table(table, store.read(context.partition_key, table))
        return dg.AssetCheckResult(
            passed=result.passed,
            severity=ERROR if blocking else WARN,
            description=result.message,
            metadata={"expectations": result.evaluated, "failures": result.failures},
        )

    return _check


@dg.asset_check(asset="prompts", blocking=True, partitions_def=ROUNDS)
def check_unique_prompts(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """No prompt appears twice in the round (same id, or the same normalized text)."""
    frame = storage.store().read(context.partition_key, "prompts")
    return to_check_result(prompt_gates.gate_unique_prompts(frame))


@dg.asset_check(asset="prompts", blocking=True, partitions_def=ROUNDS)
def check_not_empty_prompts(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """Every prompt has text, and every ground-truth row an answer."""
    frame = storage.store().read(context.partition_key, "prompts")
    return to_check_result(prompt_gates.gate_nonempty_prompts(frame))


@dg.asset_check(asset="prompts", blocking=True, partitions_def=ROUNDS)
def check_length_prompts(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, task: TaskResource
) -> dg.AssetCheckResult:
    """Every prompt is within `min_prompt_chars`..`max_prompt_chars` characters."""
    frame = storage.store().read(context.partition_key, "prompts")
    gate = prompt_gates.gate_prompt_lengths(frame, task.min_prompt_chars, task.max_prompt_chars)
    return to_check_result(gate)


@dg.asset_check(asset="prompts", blocking=True, partitions_def=ROUNDS)
def check_no_contamination_prompts(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, gates: GatesResource
) -> dg.AssetCheckResult:
    """No train prompt (synthesized ones included) is an exact or near duplicate of a
    held-out eval prompt."""
    frame = storage.store().read(context.partition_key, "prompts")
    gate = quality.gate_no_contamination(
        star.train_prompts(frame), star.eval_prompts(frame), gates.near_duplicate_threshold
    )
    return to_check_result(gate)


@dg.asset_check(asset="filtered", blocking=True, partitions_def=ROUNDS)
def check_min_rows_filtered(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, gates: GatesResource
) -> dg.AssetCheckResult:
    """The filtered set has at least `min_filtered` rows (an empty round cannot train)."""
    frame = storage.store().read(context.partition_key, "filtered")
    return to_check_result(quality.gate_min_rows(frame, gates.min_filtered))


@dg.asset_check(asset="filtered", blocking=True, partitions_def=ROUNDS)
def check_unique_generation_id_filtered(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """No generation is in the filtered set twice."""
    frame = storage.store().read(context.partition_key, "filtered")
    return to_check_result(quality.gate_unique_ids(frame, "generation_id"))


@dg.asset_check(asset="filtered", blocking=True, partitions_def=ROUNDS)
def check_no_contamination_filtered(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, gates: GatesResource
) -> dg.AssetCheckResult:
    """No training prompt is an exact or near duplicate of a held-out eval prompt."""
    store, round_ = storage.store(), context.partition_key
    eval_set = star.eval_prompts(store.read(round_, "prompts"))
    gate = quality.gate_no_contamination(
        store.read(round_, "filtered"), eval_set, gates.near_duplicate_threshold
    )
    return to_check_result(gate)


@dg.asset_check(asset="checkpoint", blocking=True, partitions_def=ROUNDS)
def check_training_ran_checkpoint(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """Training loss is finite and every planned optimizer step ran."""
    manifest = read_manifest(storage.store().checkpoint_dir(context.partition_key))
    return to_check_result(quality.gate_training_ran(manifest))


@dg.asset_check(asset="checkpoint", blocking=True, partitions_def=ROUNDS)
def check_loads_and_generates_checkpoint(
    context: dg.AssetCheckExecutionContext,
    storage: StorageResource,
    generator: GeneratorResource,
) -> dg.AssetCheckResult:
    """The checkpoint loads (adapter merged onto its parent) and answers a prompt."""
    store, round_ = storage.store(), context.partition_key
    prompt = star.eval_prompts(store.read(round_, "prompts"))["prompt"][0]
    greedy = Sampling(temperature=0.0, max_new_tokens=generator.max_new_tokens)
    engine = generator.load(str(store.checkpoint_dir(round_)), store.models_dir)
    try:
        completion = engine.generate([prompt], 1, greedy)[0]
    finally:
        engine.close()
    return to_check_result(
        quality.gate_generates(prompt, completion.text, completion.completion_tokens)
    )


@dg.asset_check(asset="eval_scores", blocking=True, partitions_def=ROUNDS)
def check_no_regression_eval_scores(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, gates: GatesResource
) -> dg.AssetCheckResult:
    """The new checkpoint is not worse than the round's policy beyond the tolerance."""
    row = storage.store().read(context.partition_key, "eval_scores").row(0, named=True)
    gate = quality.gate_no_regression(
        row["accuracy_before"], row["accuracy_after"], gates.regression_tolerance
    )
    return to_check_result(gate)


@dg.asset_check(asset="eval_scores", partitions_def=ROUNDS)
def check_exploration_eval_scores(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, gates: GatesResource
) -> dg.AssetCheckResult:
    """B-STaR health: WARN when exploration (pass@k, distinct correct answers on the
    train prompts) fell by more than `max_exploration_drop` since the previous round."""
    store, round_ = storage.store(), context.partition_key
    current = store.read(round_, "eval_scores").row(0, named=True)
    parent = previous_round(round_)
    previous = (
        store.read(parent, "eval_scores").row(0, named=True)
        if parent and store.has(parent, "eval_scores")
        else None
    )
    current = {k: current.get(f"train_{k}") for k in monitors.EXPLORATION_KEYS}
    if previous is not None:
        previous = {k: previous.get(f"train_{k}") for k in monitors.EXPLORATION_KEYS}
    return to_check_result(
        monitors.exploration_dropped(current, previous, gates.max_exploration_drop), WARN
    )


@dg.asset_check(asset="generations", partitions_def=ROUNDS)
def check_token_budget_generations(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, gates: GatesResource
) -> dg.AssetCheckResult:
    """Token budget: WARN when more than `max_truncated` of the samples stopped at the
    token limit (names the share and the setting to raise, SELFIMPROVE_MAX_NEW_TOKENS)."""
    frame = storage.store().read(context.partition_key, "generations")
    return to_check_result(quality.gate_truncation(frame, gates.max_truncated), WARN)


@dg.asset_check(asset="critiques", partitions_def=ROUNDS)
def check_scored_critiques(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, gates: GatesResource
) -> dg.AssetCheckResult:
    """Critic health: WARN when more than `max_unscored` of the generations got no score
    (a judge whose replies had no readable score; unparseable replies are never guessed)."""
    frame = storage.store().read(context.partition_key, "critiques")
    return to_check_result(quality.gate_critic_readable(frame, gates.max_unscored), WARN)


def _rl_steps(storage: StorageResource, round_: str):
    """The round's per-step RL figures, or None for a round that did not train online."""
    store = storage.store()
    return store.read(round_, "rl_steps") if store.has(round_, "rl_steps") else None


@dg.asset_check(asset="eval_scores", partitions_def=ROUNDS)
def check_reward_collapse_eval_scores(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """RL health (grpo/rloo): WARN when the reward of the last quarter of the round's RL
    steps fell by more than half from the first quarter. Passes for other methods."""
    steps = _rl_steps(storage, context.partition_key)
    return to_check_result(monitors.rl_reward_collapsed(steps), WARN)


@dg.asset_check(asset="eval_scores", partitions_def=ROUNDS)
def check_entropy_collapse_eval_scores(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """RL health (grpo/rloo): WARN when the rollouts' token entropy fell below half its
    first-quarter value. Passes for other methods."""
    steps = _rl_steps(storage, context.partition_key)
    return to_check_result(monitors.rl_entropy_collapsed(steps), WARN)


@dg.asset_check(asset="eval_scores", partitions_def=ROUNDS)
def check_length_blowup_eval_scores(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """RL health (grpo/rloo): WARN when rollouts grew past twice their first-quarter
    length or more than half hit the length limit. Passes for other methods."""
    steps = _rl_steps(storage, context.partition_key)
    return to_check_result(monitors.rl_length_blew_up(steps), WARN)


# Checks of tables only online RL rounds write: Dagster skips them in other rounds
# (their asset is not materialized), so a STaR round evaluates the rest.
RL_ONLY_CHECKS = ("check_schema_rollouts",)

ROUND_CHECKS = [
    suite_check("prompts", "prompts", blocking=True),
    check_unique_prompts,
    check_not_empty_prompts,
    check_length_prompts,
    check_no_contamination_prompts,
    suite_check("generations", "generations", blocking=True),
    check_token_budget_generations,
    suite_check("critiques", "critiques", blocking=True),
    check_scored_critiques,
    suite_check("filtered", "filtered", blocking=True),
    check_min_rows_filtered,
    check_unique_generation_id_filtered,
    check_no_contamination_filtered,
    check_training_ran_checkpoint,
    check_loads_and_generates_checkpoint,
    check_no_regression_eval_scores,
    check_exploration_eval_scores,
    check_reward_collapse_eval_scores,
    check_entropy_collapse_eval_scores,
    check_length_blowup_eval_scores,
    suite_check("eval_details", "eval_details", blocking=False),
    # A record of training (nothing downstream reads it): WARN, like eval_details.
    suite_check("rollouts", "rollouts", blocking=False, optional=True),
]
