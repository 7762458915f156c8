"""Adaptive curriculum for a verifiable task family: train where the policy is neither
always right nor always wrong.

A task family (`tasks.FAMILIES`) has difficulty bands (e.g. digits per operand). Each
round the curriculum

1. measures the solve rate per band (the fraction of sampled answers the verifier
   accepts), in one of two ways (`measure`):
   - `policy` (default): the round's own policy answers `measure_per_band` fresh
     problems per band, `measure_samples` times each, before the round's prompts are
     drawn (`measure_policy`). This is the model that will generate the round, so the
     choice is never a round late; it costs a few hundred short samples.
   - `previous_round`: round N−1's critiques joined on `prompt_id` with its prompts
     (which carry `band`). Free, but those answers came from round N−1's policy,
     before its training: after a round that taught a lot the curriculum still sees
     the weaker model and stays on a band the policy has outgrown.
     (Seen on SmolLM2-135M: the base model's round_000 generations put band 1 at
     0.30, so round_001 trained on band 1 again, although round_000's checkpoint,
     sampling in round_001, then solved band 1 at 0.85.)
2. chooses the band whose solve rate is closest to `target` (B-STaR / Auto-CEI / eva:
   the prompts that teach most are the ones the policy sometimes solves), and records
   why,
3. draws the round's train prompts: most from the chosen band, `replay_fraction` from
   easier bands (against forgetting), and `probe_per_band` from every other band (with
   measure=previous_round, so that the next round has a solve rate for every band).

The held-out set is fixed across rounds (`eval_bands`, drawn once from the seed):
only the train prompts move, so accuracy before -> after stays comparable.

The curriculum is arithmetic: its bands come from the generators of a task family
(`tasks.FAMILIES`: addition by digits, by operands), and those write numeric problems.
Answers are judged through the verifier dispatch with the family's verifier (numeric),
as every critic judges a row; solve rates from round N−1 read the critiques' `correct`,
which the round's verifier wrote per row. A dataset of another task type cannot be
banded (it has no difficulty generator), and mixing the arithmetic curriculum with
one would blend two tasks in one held-out accuracy, so `check_mix` refuses a round
whose other sources give non-numeric rows.

    rates, samples = measure_policy(engine, config, seed, round_number, exclude, sampling)
    band, reason = choose_band(rates_dict(rates), bands=(1, 2, 3), target=0.5)
    rows = draw_train(family, band, bands, n=200, replay_fraction=0.2, probe_per_band=8, ...)
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import polars as pl

from selfimprove_dagster.engines.base import GenerationEngine, Sampling
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.ids import prompt_id
from selfimprove_dagster.progress import LogFn
from selfimprove_dagster.sources.tasks import FAMILIES, TaskFamily, draw_problems, problem_key
from selfimprove_dagster.verifiers.dispatch import verifier_name, verify_rows

# Why a train row of a curriculum round is there.
ROLE_CHOSEN, ROLE_REPLAY, ROLE_PROBE = "chosen", "replay", "probe"
# Where the solve rates per band come from (see the module docstring).
MEASURE_POLICY, MEASURE_PREVIOUS_ROUND = "policy", "previous_round"


@dataclass(frozen=True)
class CurriculumConfig:
    """How the curriculum picks and draws bands (all fields have defaults but `family`)."""

    family: str  # a key of tasks.FAMILIES
    bands: tuple[int, ...] = ()  # bands it may train on (empty: all of the family's)
    eval_bands: tuple[int, ...] = ()  # the fixed held-out set (empty: the hardest band)
    target: float = 0.5  # solve rate the chosen band should be closest to
    replay_fraction: float = 0.2  # share of train prompts drawn from easier bands
    probe_per_band: int = 8  # train prompts from every band, to measure all solve rates
    start_band: int | None = None  # round 0's band (None: the easiest / the measured one)
    measure: str = MEASURE_POLICY  # where solve rates come from: policy / previous_round
    measure_per_band: int = 16  # measure=policy: problems per band the policy answers
    measure_samples: int = 4  # measure=policy: samples per problem

    def __post_init__(self) -> None:
        family = family_of(self.family)
        for name, chosen in (("bands", self.bands), ("eval_bands", self.eval_bands)):
            unknown = sorted(set(chosen) - set(family.bands))
            if unknown:
                raise SelfImproveError(
                    f"curriculum {name} {unknown} are not bands of {self.family!r}",
                    f"use bands among {', '.join(map(str, sorted(family.bands)))}",
                )
        if not 0.0 <= self.target <= 1.0 or not 0.0 <= self.replay_fraction < 1.0:
            raise SelfImproveError(
                f"curriculum target={self.target}, replay_fraction={self.replay_fraction}",
                "use a target in 0..1 and a replay fraction in 0..1 (excluded)",
            )
        if self.measure not in (MEASURE_POLICY, MEASURE_PREVIOUS_ROUND):
            raise SelfImproveError(
                f"curriculum measure {self.measure!r} is unknown",
                f"use {MEASURE_POLICY!r} (the round's policy answers a few problems per band) "
                f"or {MEASURE_PREVIOUS_ROUND!r} (round N-1's critiques)",
            )
        if self.measure_per_band < 1 or self.measure_samples < 1:
            raise SelfImproveError(
                f"curriculum measures {self.measure_per_band} problems x "
                f"{self.measure_samples} samples per band",
                "use at least 1 problem and 1 sample per band",
            )
        if self.start_band is not None and self.start_band not in self.train_bands:
            raise SelfImproveError(
                f"curriculum start band {self.start_band} is not among {self.train_bands}",
                "pick a start band among the curriculum's bands",
            )

    @property
    def train_bands(self) -> tuple[int, ...]:
        return tuple(sorted(self.bands or family_of(self.family).bands))

    @property
    def held_out_bands(self) -> tuple[int, ...]:
        return tuple(sorted(self.eval_bands or (max(family_of(self.family).bands),)))


def family_of(name: str) -> TaskFamily:
    if name not in FAMILIES:
        raise SelfImproveError(
            f"unknown task family {name!r}", f"use one of {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[name]


# --- 1. measure ------------------------------------------------------------------------


def solve_rates(prompts: pl.DataFrame, critiques: pl.DataFrame) -> pl.DataFrame:
    """Solve rate per band of a finished round: accepted samples / samples.

    Joins the round's critiques (`prompt_id`, `correct`) with its prompts (`prompt_id`,
    `band`); prompts without a band (other sources) are left out.
    Rows: band, prompts, samples, correct, solve_rate; sorted by band.
    """
    if "band" not in prompts.columns or critiques.height == 0:
        return pl.DataFrame(
            schema={
                "band": pl.Int64,
                "prompts": pl.UInt32,
                "samples": pl.UInt32,
                "correct": pl.Int64,
                "solve_rate": pl.Float64,
            }
        )
    banded = prompts.filter(pl.col("band").is_not_null()).select("prompt_id", "band").unique()
    return (
        critiques.select("prompt_id", "correct")
        .join(banded, on="prompt_id", how="inner")
        .group_by("band")
        .agg(
            prompts=pl.col("prompt_id").n_unique(),
            samples=pl.len(),
            correct=pl.col("correct").cast(pl.Int64).sum(),
        )
        .with_columns(solve_rate=pl.col("correct") / pl.col("samples"))
        .with_columns(pl.col("band").cast(pl.Int64))
        .sort("band")
    )


def measure_policy(
    engine: GenerationEngine,
    config: CurriculumConfig,
    seed: int,
    round_number: int,
    exclude: set[object],
    sampling: Sampling,
    log: LogFn | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Solve rate per band of `engine` itself: `measure_per_band` fresh problems per
    train band (never one of `exclude`, the held-out problems), `measure_samples`
    samples each, checked by the verifier.

    Returns (rates as `solve_rates` gives them, one row per sample: band, prompt_id,
    prompt, answer, sample_index, completion, correct). The problems are measured
    only, never trained on.
    """
    family = family_of(config.family)
    problems: list[tuple[str, str, int]] = []
    for band in config.train_bands:
        rng = random.Random(f"measure:{config.family}:{band}:{seed}:{round_number}")
        drawn = draw_problems(family.bands[band], config.measure_per_band, rng, exclude)
        problems += [(p, a, band) for p, a in drawn]
    completions = engine.generate(
        [p for p, _, _ in problems], config.measure_samples, sampling, log=log
    )
    verdicts = verify_rows(
        [c.text for c in completions],
        [{"answer": problems[c.prompt_index][1], "verifier": family.verifier} for c in completions],
    )
    samples = pl.DataFrame(
        [
            {
                "band": problems[c.prompt_index][2],
                "prompt_id": prompt_id(problems[c.prompt_index][0]),
                "prompt": problems[c.prompt_index][0],
                "answer": problems[c.prompt_index][1],
                "sample_index": c.sample_index,
                "completion": c.text,
                "correct": verdict.correct,
            }
            for c, verdict in zip(completions, verdicts, strict=True)
        ],
        schema={
            "band": pl.Int64,
            "prompt_id": pl.String,
            "prompt": pl.String,
            "answer": pl.String,
            "sample_index": pl.Int64,
            "completion": pl.String,
            "correct": pl.Boolean,
        },
    )
    return solve_rates(samples.select("prompt_id", "band"), samples), samples


def check_mix(prompts: pl.DataFrame) -> None:
    """A SelfImproveError when the round's prompts mix the (numeric) curriculum with
    rows of another verifier (multiple choice, math, code, custom): one held-out
    accuracy would then average two tasks, and the other task cannot be banded."""
    if "source" not in prompts.columns or "verifier" not in prompts.columns:
        return
    if prompts.filter(pl.col("source") == "curriculum").height == 0:
        return
    others = sorted(
        {
            verifier_name({"verifier": v})
            for v in prompts.filter(pl.col("source") != "curriculum")["verifier"].to_list()
        }
        - {"numeric"}
    )
    if others:
        raise SelfImproveError(
            f"the curriculum draws arithmetic problems (numeric answers), but the round's "
            f"other prompt sources give {', '.join(others)} rows: the held-out accuracy "
            "would average two different tasks, and those rows have no difficulty bands",
            "run the curriculum on its own or with numeric sources (SELFIMPROVE_SOURCES="
            "curriculum, or curriculum=0.7,self_instruct=0.3), and train the "
            f"{', '.join(others)} dataset in a run of its own (SELFIMPROVE_SOURCES=dataset)",
        )


def rates_dict(rates: pl.DataFrame) -> dict[int, float]:
    return dict(zip(rates["band"].to_list(), rates["solve_rate"].to_list(), strict=True))


# --- 2. choose -------------------------------------------------------------------------


def choose_band(
    rates: Mapping[int, float],
    bands: Sequence[int],
    target: float = 0.5,
    start_band: int | None = None,
) -> tuple[int, str]:
    """The band to train on next, and the reason (which names the figures).

    - No band measured (round 0): `start_band`, else the easiest band.
    - Otherwise the measured band whose solve rate is closest to `target`; ties go to
      the harder band (it teaches more for the same distance).
    - If even that band is too easy (solve rate above target) and a harder band was
      not measured, move up to the next harder band; if it is too hard and an easier
      band was not measured, move down. (With probes on every band this only happens
      when a band had no prompts.)
    """
    bands = sorted(bands)
    if not bands:
        raise SelfImproveError("the curriculum has no bands", "list at least one band")
    measured = {b: float(rates[b]) for b in bands if b in rates and rates[b] is not None}
    if not measured:
        start = start_band if start_band is not None else bands[0]
        return start, f"no solve rates measured yet: start at band {start} (target {target:.2f})"
    # Distances rounded: 0.7 - 0.5 and 0.5 - 0.3 must tie (floats say 0.19999... < 0.2).
    best = min(measured, key=lambda b: (round(abs(measured[b] - target), 9), -b))
    table = ", ".join(f"band {b}: {r:.2f}" for b, r in sorted(measured.items()))
    rate = measured[best]
    if rate > target:
        harder = [b for b in bands if b > best and b not in measured]
        if harder:
            return harder[0], (
                f"band {best} is the closest to target {target:.2f} but too easy ({rate:.2f}); "
                f"move up to unmeasured band {harder[0]} (solve rates {table})"
            )
    elif rate < target:
        easier = [b for b in bands if b < best and b not in measured]
        if easier:
            return easier[-1], (
                f"band {best} is the closest to target {target:.2f} but too hard ({rate:.2f}); "
                f"move down to unmeasured band {easier[-1]} (solve rates {table})"
            )
    return best, (
        f"band {best} solve rate {rate:.2f} is the closest to target {target:.2f} "
        f"(solve rates {table})"
    )


# --- 3. draw ---------------------------------------------------------------------------


def allocate_train(
    n: int, chosen: int, bands: Sequence[int], replay_fraction: float, probe_per_band: int
) -> dict[tuple[int, str], int]:
    """How many train prompts each (band, role) gets out of `n`.

    Probes first (`probe_per_band` from every band other than the chosen one, so every
    band gets measured when solve rates come from the previous round; with
    measure=policy they are a little practice at every band; together at most a quarter
    of `n`), then replay
    (`replay_fraction` of `n`, spread over the bands easier than the chosen one; none
    when it is the easiest), the rest from the chosen band.
    """
    plan: dict[tuple[int, str], int] = {}
    others = [b for b in sorted(bands) if b != chosen]
    per_band = min(probe_per_band, (n // 4) // len(others)) if others else 0
    left = n
    for band in others:
        take = min(per_band, left)
        if take:
            plan[(band, ROLE_PROBE)] = take
            left -= take
    easier = [b for b in others if b < chosen]
    replay = min(round(replay_fraction * n), left) if easier else 0
    for i, band in enumerate(easier):
        share = replay // len(easier) + (1 if i < replay % len(easier) else 0)
        if share:
            plan[(band, ROLE_REPLAY)] = share
    plan[(chosen, ROLE_CHOSEN)] = left - replay
    return plan


def draw_eval(config: CurriculumConfig, n_eval: int, seed: int) -> list[tuple[str, str, int]]:
    """The held-out set: `n_eval` problems spread over the eval bands, drawn from `seed`
    alone, so every round scores the same prompts. Rows: (prompt, answer, band)."""
    family = family_of(config.family)
    held_out = config.held_out_bands
    rows: list[tuple[str, str, int]] = []
    for i, band in enumerate(held_out):
        share = n_eval // len(held_out) + (1 if i < n_eval % len(held_out) else 0)
        rng = random.Random(f"eval:{config.family}:{band}:{seed}")
        drawn = draw_problems(family.bands[band], share, rng)
        if len(drawn) < share:
            raise SelfImproveError(
                f"band {band} of {config.family!r} has only {len(drawn)} distinct problems, "
                f"{share} held-out ones were requested",
                "lower n_eval, or hold out a band with more problems",
            )
        rows += [(p, a, band) for p, a in drawn]
    return rows


def draw_train(
    config: CurriculumConfig,
    chosen: int,
    n: int,
    seed: int,
    round_number: int,
    exclude: set[object],
) -> list[tuple[str, str, int, str]]:
    """The round's train prompts: (prompt, answer, band, role) per row.

    Fresh problems every round (the rng is seeded with the round number), never one of
    `exclude` (the held-out problems' `problem_key`s) and never twice. A band with
    fewer distinct problems than asked for gives what it has.
    """
    family = family_of(config.family)
    plan = allocate_train(
        n, chosen, config.train_bands, config.replay_fraction, config.probe_per_band
    )
    taken = set(exclude)
    rows: list[tuple[str, str, int, str]] = []
    for (band, role), count in sorted(plan.items()):
        rng = random.Random(f"train:{config.family}:{band}:{role}:{seed}:{round_number}")
        for prompt, answer in draw_problems(family.bands[band], count, rng, taken):
            taken.add(problem_key(prompt, answer))
            rows.append((prompt, answer, band, role))
    return rows
