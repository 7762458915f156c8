"""Quality gates of a round. Blocking gates (severity ERROR) stop everything downstream
of the asset they check; health monitors WARN with their figures in metadata.

Check logic lives in the core (`selfimprove_dagster.quality`: `gates`, `expectations`,
`monitors`), as pure functions; each gate here reads the round's tables and calls one,
and `round_checks(loop)` turns every gate into one loop's `@dg.asset_check`.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg

from selfimprove_dagster.assets.loop import Loop, Step
from selfimprove_dagster.engines.base import Sampling
from selfimprove_dagster.methods import star
from selfimprove_dagster.models import read_manifest
from selfimprove_dagster.quality import expectations, monitors, prompt_gates
from selfimprove_dagster.quality import gates as quality
from selfimprove_dagster.store.storage import previous_round

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


@dataclass(frozen=True)
class Gate:
    """One check of a round table: `evaluate(step)` returns the core gate's result."""

    name: str
    table: str
    blocking: bool
    evaluate: Callable[[Step], quality.GateResult]

    @property
    def description(self) -> str:
        return (self.evaluate.__doc__ or "").strip()


def _read(step: Step, table: str):
    return step.store.read(step.round, table)


# --- prompts ------------------------------------------------------------------------


def unique_prompts(step: Step) -> quality.GateResult:
    """No prompt appears twice in the round (same id, or the same normalized text)."""
    return prompt_gates.gate_unique_prompts(_read(step, "prompts"))


def not_empty_prompts(step: Step) -> quality.GateResult:
    """Every prompt has text, and every ground-truth row an answer."""
    return prompt_gates.gate_nonempty_prompts(_read(step, "prompts"))


def length_prompts(step: Step) -> quality.GateResult:
    """Every prompt is within `min_prompt_chars`..`max_prompt_chars` characters."""
    task = step.settings.task
    return prompt_gates.gate_prompt_lengths(
        _read(step, "prompts"), task.min_prompt_chars, task.max_prompt_chars
    )


def no_contamination_prompts(step: Step) -> quality.GateResult:
    """No train prompt (synthesized ones included) is an exact or near duplicate of a
    held-out eval prompt."""
    frame = _read(step, "prompts")
    return quality.gate_no_contamination(
        star.train_prompts(frame),
        star.eval_prompts(frame),
        step.settings.gates.near_duplicate_threshold,
    )


# --- generations, critiques, filtered -----------------------------------------------


def token_budget_generations(step: Step) -> quality.GateResult:
    """Token budget: WARN when more than `max_truncated` of the samples stopped at the
    token limit (names the share and the setting to raise, max_new_tokens)."""
    return quality.gate_truncation(_read(step, "generations"), step.settings.gates.max_truncated)


def scored_critiques(step: Step) -> quality.GateResult:
    """Critic health: WARN when more than `max_unscored` of the generations got no score
    (a judge whose replies had no readable score; unparseable replies are never guessed)."""
    return quality.gate_critic_readable(_read(step, "critiques"), step.settings.gates.max_unscored)


def min_rows_filtered(step: Step) -> quality.GateResult:
    """The filtered set has at least `min_filtered` rows (an empty round cannot train)."""
    return quality.gate_min_rows(_read(step, "filtered"), step.settings.gates.min_filtered)


def unique_generation_id_filtered(step: Step) -> quality.GateResult:
    """No generation is in the filtered set twice."""
    return quality.gate_unique_ids(_read(step, "filtered"), "generation_id")


def no_contamination_filtered(step: Step) -> quality.GateResult:
    """No training prompt is an exact or near duplicate of a held-out eval prompt."""
    eval_set = star.eval_prompts(_read(step, "prompts"))
    return quality.gate_no_contamination(
        _read(step, "filtered"), eval_set, step.settings.gates.near_duplicate_threshold
    )


# --- checkpoint ----------------------------------------------------------------------


def training_ran_checkpoint(step: Step) -> quality.GateResult:
    """Training loss is finite and every planned optimizer step ran."""
    return quality.gate_training_ran(read_manifest(step.store.checkpoint_dir(step.round)))


def loads_and_generates_checkpoint(step: Step) -> quality.GateResult:
    """The checkpoint loads (adapter merged onto its parent) and answers a prompt."""
    generator = step.settings.generator
    prompt = star.eval_prompts(_read(step, "prompts"))["prompt"][0]
    greedy = Sampling(temperature=0.0, max_new_tokens=generator.max_new_tokens)
    engine = generator.load(str(step.store.checkpoint_dir(step.round)), step.store.models_dir)
    try:
        completion = engine.generate([prompt], 1, greedy)[0]
    finally:
        engine.close()
    return quality.gate_generates(prompt, completion.text, completion.completion_tokens)


# --- eval_scores ---------------------------------------------------------------------


def no_regression_eval_scores(step: Step) -> quality.GateResult:
    """The new checkpoint is not worse than the round's policy beyond the tolerance."""
    row = _read(step, "eval_scores").row(0, named=True)
    return quality.gate_no_regression(
        row["accuracy_before"], row["accuracy_after"], step.settings.gates.regression_tolerance
    )


def exploration_eval_scores(step: Step) -> quality.GateResult:
    """B-STaR health: WARN when exploration (pass@k, distinct correct answers on the
    train prompts) fell by more than `max_exploration_drop` since the previous round."""
    current = _read(step, "eval_scores").row(0, named=True)
    parent = previous_round(step.round)
    has_parent = parent is not None and step.store.has(parent, "eval_scores")
    previous = step.store.read(parent, "eval_scores").row(0, named=True) if has_parent else None
    current = {k: current.get(f"train_{k}") for k in monitors.EXPLORATION_KEYS}
    if previous is not None:
        previous = {k: previous.get(f"train_{k}") for k in monitors.EXPLORATION_KEYS}
    return monitors.exploration_dropped(current, previous, step.settings.gates.max_exploration_drop)


def _rl_steps(step: Step):
    """The round's per-step RL figures, or None for a round that did not train online."""
    return _read(step, "rl_steps") if step.store.has(step.round, "rl_steps") else None


def reward_collapse_eval_scores(step: Step) -> quality.GateResult:
    """RL health (grpo/rloo): WARN when the reward of the last quarter of the round's RL
    steps fell by more than half from the first quarter. Passes for other methods."""
    return monitors.rl_reward_collapsed(_rl_steps(step))


def entropy_collapse_eval_scores(step: Step) -> quality.GateResult:
    """RL health (grpo/rloo): WARN when the rollouts' token entropy fell below half its
    first-quarter value. Passes for other methods."""
    return monitors.rl_entropy_collapsed(_rl_steps(step))


def length_blowup_eval_scores(step: Step) -> quality.GateResult:
    """RL health (grpo/rloo): WARN when rollouts grew past twice their first-quarter
    length or more than half hit the length limit. Passes for other methods."""
    return monitors.rl_length_blew_up(_rl_steps(step))


def schema_suite(table: str, optional: bool = False):
    """A Great Expectations suite (`expectations.SUITES[table]`) as a gate. `optional`: a
    table only some rounds write (rollouts: online RL rounds) passes, saying so, in a
    round that did not write it."""

    def suite(step: Step) -> quality.GateResult:
        if optional and not step.store.has(step.round, table):
            return quality.GateResult(
                True, None, None, f"`{table}`: not written in this round (nothing to check)"
            )
        result = expectations.validate_table(table, _read(step, table))
        return quality.GateResult(
            result.passed,
            result.evaluated,
            None,
            result.message,
            {"expectations": result.evaluated, "failures": result.failures},
        )

    suite.__doc__ = f"Great Expectations suite `{table}`: schema, nulls, value sets, ranges."
    return suite


def _gate(name: str, table: str, blocking: bool, evaluate=None) -> Gate:
    return Gate(name, table, blocking, evaluate or globals()[name.removeprefix("check_")])


# Checks of tables only online RL rounds write: Dagster skips them in other rounds
# (their asset is not materialized), so a STaR round evaluates the rest.
RL_ONLY_CHECKS = ("check_schema_rollouts",)

GATES = [
    _gate("check_schema_prompts", "prompts", True, schema_suite("prompts")),
    _gate("check_unique_prompts", "prompts", True),
    _gate("check_not_empty_prompts", "prompts", True),
    _gate("check_length_prompts", "prompts", True),
    _gate("check_no_contamination_prompts", "prompts", True),
    _gate("check_schema_generations", "generations", True, schema_suite("generations")),
    _gate("check_token_budget_generations", "generations", False),
    _gate("check_schema_critiques", "critiques", True, schema_suite("critiques")),
    _gate("check_scored_critiques", "critiques", False),
    _gate("check_schema_filtered", "filtered", True, schema_suite("filtered")),
    _gate("check_min_rows_filtered", "filtered", True),
    _gate("check_unique_generation_id_filtered", "filtered", True),
    _gate("check_no_contamination_filtered", "filtered", True),
    _gate("check_training_ran_checkpoint", "checkpoint", True),
    _gate("check_loads_and_generates_checkpoint", "checkpoint", True),
    _gate("check_no_regression_eval_scores", "eval_scores", True),
    _gate("check_exploration_eval_scores", "eval_scores", False),
    _gate("check_reward_collapse_eval_scores", "eval_scores", False),
    _gate("check_entropy_collapse_eval_scores", "eval_scores", False),
    _gate("check_length_blowup_eval_scores", "eval_scores", False),
    _gate("check_schema_eval_details", "eval_details", False, schema_suite("eval_details")),
    # A record of training (nothing downstream reads it): WARN, like eval_details.
    _gate("check_schema_rollouts", "rollouts", False, schema_suite("rollouts", optional=True)),
]


def round_check(loop: Loop, gate: Gate) -> dg.AssetChecksDefinition:
    """One gate as one loop's partitioned asset check (ERROR when blocking, else WARN)."""
    with warnings.catch_warnings():
        # Per-round check results need `partitions_def` on checks (a Dagster preview).
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return _round_check(loop, gate)


def _round_check(loop: Loop, gate: Gate) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=loop.key(gate.table),
        name=gate.name,
        blocking=gate.blocking,
        partitions_def=loop.partitions,
        description=gate.description,
        required_resource_keys=loop.resource_keys(),
    )
    def check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        result = gate.evaluate(loop.step(context))
        return to_check_result(result, ERROR if gate.blocking else WARN)

    return check


def round_checks(loop: Loop) -> list[dg.AssetChecksDefinition]:
    """Every gate of a round, for one loop."""
    return [round_check(loop, gate) for gate in GATES]
