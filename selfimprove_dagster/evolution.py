"""Continuous evolution: when to run another round, which checkpoint to promote, and
which sampling temperature the next round should use.

Pure functions over the round history (`RoundStore.eval_history(done_rounds)`: one
`eval_scores` row per done round, with `round`, `accuracy_before`, `accuracy_after` and
the B-STaR monitors) and over a snapshot of Dagster's record (`RecordSnapshot`: which
rounds are done, as `RoundState.done` defines it). The sensor, the schedule and the
CLI all decide with `decide_next`:

    plan = decide_next(record.snapshot(), store.eval_history, StopRules())
    plan.decision.proceed, plan.decision.next_round, plan.decision.reason

`promoted_round` is the checkpoint to serve (best held-out accuracy among rounds that
did not regress) and `promotion` the `promoted_policy` record with its reason;
`history_table` is what the `history` asset shows (assets/policy.py wraps both);
`choose_policy` is the checkpoint that generates the next round.
`choose_temperature` is B-STaR's practical rule for the next round's temperature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import polars as pl

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.store.storage import RoundStore, previous_round, round_index, round_key

# Float slack: 0.6 - 0.1 is 0.49999999999999994, and "equal" must compare equal.
EPS = 1e-9
PolicyMode = Literal["latest", "best"]
POLICY_MODES: tuple[str, ...] = ("latest", "best")
TEMPERATURE_GRID: tuple[float, ...] = (0.6, 0.8, 1.0, 1.2)


@dataclass(frozen=True)
class StopRules:
    """When the loop stops by itself (each rule becomes the recorded skip reason)."""

    max_rounds: int = 4  # completed rounds after which the loop stops
    patience: int = 2  # stop after this many rounds in a row without improvement
    min_improvement: float = 0.005  # accuracy gain over the best so far that counts
    stop_on_regression: bool = True  # stop when the latest round scored below its policy
    # Accuracy drop not counted as a regression: held-out noise (a 200-prompt set at 80%
    # has a standard error of ~3 points). Promotion stays strict (`promoted_round`).
    regression_tolerance: float = 0.02

    def __post_init__(self) -> None:
        if self.max_rounds < 1 or self.patience < 1:
            raise SelfImproveError(
                f"Stop rules need max_rounds >= 1 and patience >= 1, got max_rounds="
                f"{self.max_rounds}, patience={self.patience}",
                "set both to 1 or more",
            )


@dataclass(frozen=True)
class Decision:
    """Whether to run another round; `reason` is shown as the sensor's skip reason or
    recorded with the run it requests."""

    proceed: bool
    next_round: str | None
    reason: str


# --- next round --------------------------------------------------------------------


@dataclass(frozen=True)
class RoundState:
    """One round as Dagster recorded it (plain data: the Dagster layer reads it from the
    instance, `assets/record.py`). The one meaning of "done" every caller uses:

        its `eval_scores` materialization exists, every blocking check passed on it
        (latest evaluation, no later planned-but-unrun attempt), no round asset upstream
        of `eval_scores` was materialized after it, and its checkpoint chain verifies
        (the adapter, its parent and the policy that sampled its data are the ones it
        recorded: a re-materialized earlier round makes it stale).
    """

    round: str
    materialized: bool  # an `eval_scores` materialization exists for the partition
    failed_gates: tuple[str, ...] = ()  # blocking checks evaluated and failed
    unrun_gates: tuple[str, ...] = ()  # planned in a run but never evaluated
    newer: tuple[str, ...] = ()  # upstream assets materialized after eval_scores
    has_runs: bool = True  # any run ever targeted the partition
    chain_problem: str | None = None  # why its checkpoint chain does not verify (None: it does)

    @property
    def gates_passed(self) -> bool:
        return not self.failed_gates and not self.unrun_gates

    @property
    def done(self) -> bool:
        return self.materialized and self.gates_passed and not self.newer and not self.chain_problem

    def bad_gates(self) -> list[str]:
        return [*self.failed_gates, *(f"{name} (did not run)" for name in self.unrun_gates)]

    def problem(self) -> str | None:
        """Why the round is not done (None when it is), on one line."""
        if not self.materialized:
            return f"{self.round} has no recorded eval_scores materialization"
        if not self.gates_passed:
            return gate_failure_reason(self.round, self.bad_gates())
        if self.newer:
            return (
                f"{self.round} is stale: {', '.join(self.newer)} was re-materialized after its "
                f"eval_scores; re-run {self.round} (`selfimprove run` or the UI)"
            )
        return self.chain_problem


@dataclass(frozen=True)
class RecordSnapshot:
    """What a next-round decision reads from Dagster's record: every round partition in
    round order and the round run still unfinished, if any (described in words)."""

    rounds: tuple[RoundState, ...]
    running: str | None = None  # e.g. "round_job is still running round_003 (run 1a2b3c4d)"

    def done_rounds(self) -> list[str]:
        return [state.round for state in self.rounds if state.done]

    def state(self, round_: str) -> RoundState | None:
        return next((s for s in self.rounds if s.round == round_), None)


@dataclass(frozen=True)
class RoundPlan:
    """A decision, and whether its round must still be added as a partition (False when
    someone added the partition but it never ran)."""

    decision: Decision
    add_partition: bool = False


def decide_next(
    snapshot: RecordSnapshot,
    history: Callable[[Sequence[str]], pl.DataFrame],
    rules: StopRules,
) -> RoundPlan:
    """The next round, from a snapshot of Dagster's record: what the sensor, the
    schedule and `selfimprove` decide with. `history(rounds)` gives those rounds'
    `eval_scores` rows.

    In order: a running round waits; a latest partition that is not done waits for a
    person (failed or unrun gates, a crash, a stale round: never retried by itself); a
    checkpoint chain that does not verify waits; otherwise the stop rules decide on the
    done rounds. A partition that was added but never ran is the next round.
    """
    if snapshot.running:
        return _wait(snapshot.running)
    done = snapshot.done_rounds()
    latest = snapshot.rounds[-1] if snapshot.rounds else None
    if latest is not None:
        if latest.materialized and not latest.gates_passed:
            # A stop with the round's figures: they say more than the gate's name.
            frame = history([*done, latest.round])
            return RoundPlan(next_round_decision(frame, False, rules, latest.bad_gates()))
        if latest.materialized and latest.newer:
            return _wait(latest.problem() or f"{latest.round} is not done")
        if not latest.materialized and latest.has_runs:
            return _wait(
                f"{latest.round} did not complete (no eval_scores): see its failed run, then "
                f"re-run {latest.round} from the UI or the CLI"
            )
    built_on = [s for s in snapshot.rounds if s.materialized and s.gates_passed and not s.newer]
    if built_on and built_on[-1].chain_problem:
        return _wait(f"not building on {built_on[-1].round}: {built_on[-1].chain_problem}")
    decision = next_round_decision(history(done), True, rules)
    known = {state.round for state in snapshot.rounds}
    return RoundPlan(decision, add_partition=decision.proceed and decision.next_round not in known)


def _wait(reason: str) -> RoundPlan:
    return RoundPlan(Decision(proceed=False, next_round=None, reason=reason))


def next_round_decision(
    history: pl.DataFrame,
    gates_passed: bool,
    rules: StopRules,
    failed_gates: Sequence[str] = (),
) -> Decision:
    """Run round N+1 after round N, unless a stop rule says otherwise.

    `history` holds one row per completed round; `gates_passed` says whether the
    latest round's blocking gates passed (`failed_gates` names those that did not).
    Rules, first match wins: a regression (if `stop_on_regression`; failed gates are
    named too), a failed gate, `max_rounds` reached, no improvement for `patience`
    rounds. An empty history starts round_000.
    """
    rounds = in_round_order(history)
    if rounds.height == 0:
        return Decision(True, round_key(0), "no completed rounds yet → run round_000")
    latest = rounds.row(rounds.height - 1, named=True)
    if rules.stop_on_regression and _regressed(latest, rules.regression_tolerance):
        # Before the gates: the figures say more than the name of the regression gate.
        gates = "" if gates_passed else f" ({gate_failure_reason(latest['round'], failed_gates)})"
        return Decision(
            False,
            None,
            f"{latest['round']} regressed {_pct(latest['accuracy_before'])} -> "
            f"{_pct(latest['accuracy_after'])}{gates}",
        )
    if not gates_passed:
        return Decision(False, None, gate_failure_reason(latest["round"], failed_gates))
    if rounds.height >= rules.max_rounds:
        return Decision(False, None, f"max rounds reached ({rules.max_rounds})")
    stale = rounds_without_improvement(rounds, rules.min_improvement)
    best_round, best_accuracy = best_so_far(rounds)
    if stale >= rules.patience:
        return Decision(
            False,
            None,
            f"no improvement for {stale} rounds (best {_pct(best_accuracy)} at {best_round})",
        )
    next_key = round_key(round_index(latest["round"]) + 1)
    verb = (
        "improved"
        if stale == 0
        else f"did not improve ({stale} of {rules.patience} rounds of patience used)"
    )
    return Decision(
        True,
        next_key,
        f"{latest['round']} {verb} {_pct(latest['accuracy_before'])} -> "
        f"{_pct(latest['accuracy_after'])} → run {next_key}",
    )


def gate_failure_reason(round_: str, failed_gates: Sequence[str] = (), shown: int = 3) -> str:
    """The skip reason for a round whose blocking gates did not all pass."""
    if not failed_gates:
        return f"a blocking gate failed in {round_}"
    names = ", ".join(failed_gates[:shown])
    more = f" and {len(failed_gates) - shown} more" if len(failed_gates) > shown else ""
    return f"a blocking gate failed in {round_}: {names}{more}"


def rounds_without_improvement(history: pl.DataFrame, min_improvement: float) -> int:
    """Completed rounds in a row, up to the latest, that did not beat the best accuracy
    seen before them by `min_improvement`. The bar starts at the base model's accuracy
    (the first round's `accuracy_before`)."""
    rounds = in_round_order(history)
    if rounds.height == 0:
        return 0
    bar = _number(rounds["accuracy_before"][0], default=-math.inf)
    stale = 0
    for accuracy in rounds["accuracy_after"]:
        accuracy = _number(accuracy, default=-math.inf)
        if accuracy >= bar + min_improvement - EPS:
            bar, stale = accuracy, 0
        else:
            stale += 1
    return stale


def best_so_far(history: pl.DataFrame) -> tuple[str, float]:
    """The best held-out accuracy so far and where it is: a round, or "the base model"
    when no round beat the first round's policy. Ties go to the earliest."""
    rounds = in_round_order(history)
    best_label, best = "the base model", _number(rounds["accuracy_before"][0], default=-math.inf)
    for round_, accuracy in rounds.select("round", "accuracy_after").iter_rows():
        accuracy = _number(accuracy, default=-math.inf)
        if accuracy > best + EPS:
            best_label, best = round_, accuracy
    return best_label, best


# --- promotion -----------------------------------------------------------------------


def promoted_round(history: pl.DataFrame, tolerance: float = 0.0) -> str | None:
    """The round whose checkpoint is served: the best `accuracy_after` among rounds that
    did not regress (`accuracy_after >= accuracy_before - tolerance`); ties go to the
    earliest round. None when no round qualifies (serve the base model).

    A regressed round stays on disk for inspection but is never promoted.
    """
    promoted, best = None, -math.inf
    for row in in_round_order(history).iter_rows(named=True):
        after = _number(row["accuracy_after"], default=None)
        if after is None or _regressed(row, tolerance):
            continue
        if after > best + EPS:
            promoted, best = row["round"], after
    return promoted


def choose_policy(history: pl.DataFrame, mode: str, tolerance: float = 0.0) -> str | None:
    """The round whose checkpoint generates the next round (None: the base model).

    - "latest": the latest completed round (plain STaR), even one that regressed; the
      `stop_on_regression` rule is what keeps the loop from building on it.
    - "best": the promoted round (`promoted_round`), so a regressed round is rolled back.
    """
    if mode not in POLICY_MODES:
        raise SelfImproveError(
            f"Unknown policy mode `{mode}`", f"use one of {', '.join(POLICY_MODES)}"
        )
    if mode == "best":
        return promoted_round(history, tolerance)
    rounds = in_round_order(history)
    return rounds["round"][-1] if rounds.height else None


@dataclass(frozen=True)
class Promotion:
    """The `promoted_policy` record: which checkpoint to serve, and why."""

    round: str | None  # None: no round qualifies, serve the base model
    checkpoint: str | None
    accuracy: float | None  # its held-out accuracy (accuracy_after)
    decided_after: str | None  # the latest round the decision saw
    reason: str

    def frame(self) -> pl.DataFrame:
        """The one-row `promoted_policy` table."""
        row = {name: getattr(self, name) for name in PROMOTION_SCHEMA}
        return pl.DataFrame([row], schema=PROMOTION_SCHEMA)


def promotion(history: pl.DataFrame, tolerance: float = 0.0) -> Promotion:
    """The promoted checkpoint of `history` (done rounds' `eval_scores` rows, with a
    `checkpoint` column) and the reason, naming the figures it was chosen on."""
    rounds = in_round_order(history)
    if rounds.height == 0:
        return Promotion(None, None, None, None, "no completed rounds yet: serve the base model")
    latest = rounds["round"][-1]
    promoted = promoted_round(rounds, tolerance)
    if promoted is None:
        return Promotion(
            None,
            None,
            None,
            latest,
            f"every round up to {latest} scored below its policy: serve the base model",
        )
    row = rounds.filter(pl.col("round") == promoted).row(0, named=True)
    others = rounds.filter(pl.col("round") != promoted).height
    reason = (
        f"{promoted} has the best held-out accuracy {_pct(row['accuracy_after'])} "
        f"(up from {_pct(row['accuracy_before'])}) among {others + 1} round(s) through "
        f"{latest}; rounds that scored below their policy are never promoted"
    )
    checkpoint = row.get("checkpoint")
    return Promotion(promoted, checkpoint, float(row["accuracy_after"]), latest, reason)


HISTORY_COLUMNS = ("round", "kept", "accuracy_before", "accuracy_after", "pass_at_k")


def history_table(
    history: pl.DataFrame, promoted: str | None = None, done: Sequence[str] | None = None
) -> pl.DataFrame:
    """The history as shown in the UI: one row per round, its headline figures, whether
    it is done (with `done`: gates passed, chain current) and whether it is the
    promoted one (columns missing from old rounds are null)."""
    rounds = in_round_order(history)
    if rounds.height == 0:
        return pl.DataFrame(schema={name: pl.Utf8 for name in HISTORY_COLUMNS})
    present = [name for name in HISTORY_COLUMNS if name in rounds.columns]
    table = rounds.select(present)
    if done is not None:
        table = table.with_columns(done=pl.col("round").is_in(list(done)))
    return table.with_columns(promoted=pl.col("round") == (promoted or ""))


PROMOTION_SCHEMA = {
    "round": pl.Utf8,
    "checkpoint": pl.Utf8,
    "accuracy": pl.Float64,
    "decided_after": pl.Utf8,
    "reason": pl.Utf8,
}


# --- B-STaR temperature --------------------------------------------------------------


@dataclass(frozen=True)
class TuningLimits:
    """Where `choose_temperature` reads a round's monitors as too little exploration or
    exploitation."""

    min_selection_precision: float = 0.9  # below: the filter keeps wrong samples
    min_balance: float = 0.5  # below (with a precise filter): too few correct samples
    min_solved_fraction: float = 0.5  # below: most train prompts get no correct sample
    saturated_solved_fraction: float = 0.95  # at or above, with a high balance: saturated
    saturated_balance: float = 0.8  # the "high balance" of a saturated round


def choose_temperature(
    round_row: Mapping[str, Any],
    *,
    current: float,
    grid: tuple[float, ...] = TEMPERATURE_GRID,
    limits: TuningLimits = TuningLimits(),
) -> tuple[float, str]:
    """The next round's sampling temperature from this round's B-STaR monitors, and a
    reason that names the figures.

    B-STaR (Zeng et al., 2024) picks the temperature that maximizes the balance score,
    which needs samples at every candidate temperature. A finished round only has its
    own temperature's figures, so this is the paper's practical reading of them, one
    grid step at a time:

    1. exploitation poor (`selection_precision` < min): one step DOWN; hotter sampling
       would add more wrong samples for the filter to let through.
    2. exploration saturated (`train_solved_fraction` >= saturated and
       `balance_score` >= saturated): one step DOWN; more randomness buys nothing.
    3. exploration low (`balance_score` or `train_solved_fraction` below its min, with
       a precise filter): one step UP, for more distinct correct samples per prompt.
    4. otherwise keep. Missing figures (None / NaN) also keep.

    `current` is snapped to the nearest grid value first. Use
    `choose_temperature_from_samples` when the balance was measured per temperature.
    """
    if not grid:
        raise SelfImproveError("The temperature grid is empty", "pass at least one temperature")
    grid = tuple(sorted(grid))
    at = min(range(len(grid)), key=lambda i: abs(grid[i] - current))
    precision = _number(round_row.get("selection_precision"), default=None)
    balance = _number(round_row.get("balance_score"), default=None)
    solved = _number(round_row.get("train_solved_fraction"), default=None)
    distinct = _number(round_row.get("train_distinct_correct_per_prompt"), default=None)
    figures = (
        f"selection precision {_fmt(precision)}, balance {_fmt(balance)}, "
        f"solved {_fmt(solved)}, distinct correct/prompt {_fmt(distinct)}"
    )
    if precision is not None and precision < limits.min_selection_precision:
        return _step(grid, at, -1, f"exploitation poor ({figures})")
    if balance is None or solved is None:
        return grid[at], f"keep T={grid[at]:g}: monitors missing ({figures})"
    if solved >= limits.saturated_solved_fraction and balance >= limits.saturated_balance:
        return _step(grid, at, -1, f"exploration saturated ({figures})")
    if balance < limits.min_balance or solved < limits.min_solved_fraction:
        return _step(grid, at, +1, f"exploration low ({figures})")
    return grid[at], f"keep T={grid[at]:g}: exploration and exploitation balanced ({figures})"


def choose_temperature_from_samples(
    per_temperature_balance: Mapping[float, float], current: float | None = None
) -> tuple[float, str]:
    """B-STaR's own rule, for a caller that measured the balance score at several
    temperatures: the argmax. Ties go to `current` when it is among them, else to the
    lowest tied temperature (less randomness for the same balance)."""
    if not per_temperature_balance:
        raise SelfImproveError(
            "No balance scores to choose a temperature from",
            "measure the balance score at one or more temperatures",
        )
    best = max(per_temperature_balance.values())
    tied = sorted(t for t, b in per_temperature_balance.items() if b >= best - EPS)
    chosen = current if current in tied else tied[0]
    table = ", ".join(f"T={t:g}: {b:.3f}" for t, b in sorted(per_temperature_balance.items()))
    return chosen, f"T={chosen:g} has the highest balance score {best:.3f} ({table})"


# --- helpers ---------------------------------------------------------------------------


def in_round_order(history: pl.DataFrame) -> pl.DataFrame:
    """History rows sorted by round index (round_1000 after round_999)."""
    if history.height == 0:
        return history
    return history.sort(_round_number())


def history_through(history: pl.DataFrame, last_round: str | None) -> pl.DataFrame:
    """History rows up to and including `last_round` (all rows when it is None)."""
    if last_round is None or history.height == 0:
        return history
    return in_round_order(history).filter(_round_number() <= round_index(last_round))


def _round_number() -> pl.Expr:
    return pl.col("round").str.extract(r"(\d+)$").cast(pl.Int64)


def _regressed(row: Mapping[str, Any], tolerance: float) -> bool:
    before = _number(row.get("accuracy_before"), default=None)
    after = _number(row.get("accuracy_after"), default=None)
    if before is None or after is None:
        return False
    return after < before - tolerance - EPS


def _step(grid: tuple[float, ...], at: int, direction: int, why: str) -> tuple[float, str]:
    to = min(max(at + direction, 0), len(grid) - 1)
    if to == at:
        edge = "top" if direction > 0 else "bottom"
        return grid[at], f"keep T={grid[at]:g} (already at the {edge} of the grid): {why}"
    verb = "raise" if direction > 0 else "lower"
    return grid[to], f"{verb} T {grid[at]:g} -> {grid[to]:g}: {why}"


def _number(value: Any, default: float | None) -> float | None:
    """A float, or `default` for None / NaN (a monitor that was undefined)."""
    if value is None:
        return default
    value = float(value)
    return default if math.isnan(value) else value


def _pct(value: Any) -> str:
    number = _number(value, default=None)
    return "n/a" if number is None or math.isinf(number) else f"{number:.1%}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# --- what a round runs with: its policy and its sampling temperature ------------------


def round_policy(
    store: RoundStore,
    round_: str,
    base_model: str,
    mode: str = "latest",
    done_rounds: Sequence[str] = (),
) -> tuple[str, str | None]:
    """The model that generates `round_`, and the round whose checkpoint it is.

    `latest`: round N−1's checkpoint. `best`: the promoted checkpoint among the done
    rounds before N (`done_rounds`, as Dagster recorded them: `RoundState.done`; best
    held-out accuracy, never a round that regressed), so a bad round is
    kept for inspection but the loop goes on from the best model. Round 0, and a
    history where every round regressed, start from the base model. Either way round
    N−1 must have a checkpoint (`RoundStore.policy_for` refuses otherwise).
    """
    latest = store.policy_for(round_, base_model)
    if mode not in POLICY_MODES:
        raise SelfImproveError(
            f"Unknown policy mode `{mode}`", f"use one of: {', '.join(POLICY_MODES)}"
        )
    parent = latest[1]
    if mode == "latest" or parent is None:
        return latest
    best = choose_policy(history_through(store.eval_history(done_rounds), parent), "best")
    if best is None:
        return base_model, None
    return store.checkpoint_ref(best), best


def round_temperature(
    store: RoundStore, round_: str, default: float, auto: bool
) -> tuple[float, str]:
    """The sampling temperature of `round_`, and why.

    With `auto`, round N−1's `eval_scores` measured the balance score of its new
    checkpoint at each temperature of the grid (`evaluation.balance_by_temperature`)
    and chose the argmax; without that measurement (it was off then), B-STaR's step
    rule (`choose_temperature`) moves round N−1's temperature from its monitors.
    """
    parent = previous_round(round_)
    if not auto:
        return default, f"fixed temperature {default:g}"
    if parent is None or not store.has(parent, "eval_scores"):
        return default, f"first round: starting temperature {default:g}"
    monitors = store.read(parent, "eval_scores").row(0, named=True)
    if monitors.get("next_temperature") is not None:
        return float(monitors["next_temperature"]), monitors["next_temperature_reason"]
    previous_temperature = float(store.read(parent, "generations")["temperature"][0])
    return choose_temperature(monitors, current=previous_temperature)
