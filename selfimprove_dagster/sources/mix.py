"""Where a round's prompts come from: pluggable sources, mixed by weights.

Sources (names used in `sources`, e.g. SELFIMPROVE_SOURCES="curriculum=0.7,self_instruct=0.3"):

- `task`:          a built-in task (`tasks.make_task`); the same train prompts every round
- `dataset`:       a user's .jsonl/.parquet file (`tasks.load_dataset_file`)
- `curriculum`:    a task family whose band follows the policy's solve rate
                   (`curriculum.py`); fresh train prompts every round
- `self_instruct`: new prompts the round's policy writes from seed tasks
                   (`synthesis.py`); train only, answers model-made (unverified)

The round's `n_train` train prompts are shared out by weight (largest remainder). The
held-out set is the union of the eval splits of the verifiable sources listed (task,
dataset, curriculum), each drawn from the seed alone, so it is the same every round; a
weight of 0 lists a source for its held-out set only. Synthesized prompts never go to
eval (they have no ground truth).

Every row of the round's table says where it came from (`source`, `band`, `role`,
`answer_source`, `answer_verified`, `origin_round`, `seed_ids`, `parent_prompt_ids`).
A prompt another source already gave is dropped at assembly (an artefact of mixing);
a source's own repeats stay for the blocking checks on `prompts` to report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import polars as pl

from selfimprove_dagster.engines.base import GenerationEngine, Sampling
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.ids import prompt_id
from selfimprove_dagster.progress import LogFn
from selfimprove_dagster.sources import curriculum as cur
from selfimprove_dagster.sources import synthesis as syn
from selfimprove_dagster.sources.tasks import VERIFIER_COLUMNS
from selfimprove_dagster.store.storage import RoundStore, previous_round, round_index, round_key
from selfimprove_dagster.text import normalize_prompt

SOURCES = ("task", "dataset", "curriculum", "self_instruct")
VERIFIABLE = ("task", "dataset", "curriculum")

PROMPT_SCHEMA: dict[str, pl.DataType] = {
    "round": pl.String(),
    "prompt_id": pl.String(),
    "prompt": pl.String(),
    "answer": pl.String(),
    "split": pl.String(),  # train / eval
    "task": pl.String(),  # task or family name, dataset stem, or "self_instruct"
    "source": pl.String(),  # one of SOURCES
    "band": pl.Int64(),  # curriculum difficulty band (null for other sources)
    "role": pl.String(),  # curriculum: chosen / replay / probe; null otherwise
    "answer_source": pl.String(),  # generator / dataset / ensemble_consensus
    "answer_verified": pl.Boolean(),  # False: the answer is model-made
    "origin_round": pl.String(),  # round the prompt was written in (synthesized)
    "seed_ids": pl.List(pl.String()),  # seed tasks it was written from
    "parent_prompt_ids": pl.List(pl.String()),  # earlier synthesized prompts it saw
    # What the row's verifier reads (sources.tasks.VERIFIER_COLUMNS); null: numeric.
    "verifier": pl.String(),
    "choices": pl.String(),  # multiple choice: JSON object label -> text
    "tests": pl.List(pl.String()),  # code: test statements
    "test_setup": pl.String(),  # code: run before the tests
    "entry_point": pl.String(),  # code: the function the tests call
}

CANDIDATES_TABLE = "prompt_candidates"
MIX_TABLE = "prompt_mix"
MEASURE_TABLE = "curriculum_measure"  # the policy's answers the band choice rests on


@dataclass(frozen=True)
class PromptPlan:
    """Everything the prompts stage needs (built by `resources.TaskResource.plan`)."""

    weights: Mapping[str, float]  # source -> weight (parse_mix)
    n_train: int
    n_eval: int
    seed: int
    task: str = "addition_2digit"
    dataset_path: str = ""
    curriculum: cur.CurriculumConfig | None = None
    synthesis: syn.SynthesisConfig | None = None  # its `n` is set per round from weights
    seed_tasks_path: str = ""
    # The `task` / `dataset` source's problem table for n train rows, (source, n) -> table,
    # when the caller has its own (`TaskResource.problem_loader`: answer format, verifier
    # override, contamination drops); else built here from the fields above.
    load_problems: Callable[[str, int], pl.DataFrame] | None = None
    # Where `load_problems` appends the dataset train rows it dropped as contaminated
    # (`drop_contaminated`); `round_prompts` records each in `prompt_candidates`.
    contaminated: list[dict] = field(default_factory=list)


@dataclass
class RoundPrompts:
    """The prompts stage's output: the round's table, the synthesis candidates, the mix."""

    prompts: pl.DataFrame
    candidates: pl.DataFrame | None
    mix: pl.DataFrame  # one row per source: weight, train/eval rows, choice and reason
    measurements: pl.DataFrame | None = None  # curriculum measure=policy: every sample
    notes: dict = field(default_factory=dict)  # metadata for the asset
    contaminated: list[dict] = field(default_factory=list)  # dataset train rows dropped

    def tables(self) -> dict[str, pl.DataFrame | None]:
        """The prompts step's tables by name (None: not written this round)."""
        return {
            "prompts": self.prompts,
            MIX_TABLE: self.mix,
            MEASURE_TABLE: self.measurements,
            CANDIDATES_TABLE: self.candidates,
        }


def parse_mix(entries: Sequence[str] | str) -> dict[str, float]:
    """`["curriculum=0.7", "self_instruct=0.3"]` (or one comma-separated string; a bare
    name weighs 1) -> {"curriculum": 0.7, "self_instruct": 0.3}."""
    if isinstance(entries, str):
        entries = entries.split(",")
    weights: dict[str, float] = {}
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        name, _, weight = entry.partition("=")
        name = name.strip()
        if name not in SOURCES:
            raise SelfImproveError(
                f"unknown prompt source {name!r} in {list(entries)}",
                f"use {', '.join(SOURCES)}, each with an optional weight (e.g. task=0.5)",
            )
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            value = -1.0
        if value < 0 or value != value:
            raise SelfImproveError(
                f"prompt source {name!r} has weight {weight!r}", "give a number >= 0"
            )
        weights[name] = weights.get(name, 0.0) + value
    if not weights or sum(weights.values()) <= 0:
        raise SelfImproveError(
            f"the prompt sources {list(entries)} give no train prompts",
            "list at least one source with a weight > 0 (e.g. SELFIMPROVE_SOURCES=task)",
        )
    if not any(name in VERIFIABLE for name in weights):
        raise SelfImproveError(
            "the prompt sources have no held-out set: synthesized prompts have no ground truth",
            "add a verifiable source (task, dataset or curriculum), with weight 0 to use it "
            "for the held-out set only, e.g. task=0,self_instruct=1",
        )
    return weights


def allocate(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """`n` train prompts shared out by weight (largest remainder; ties by listing order)."""
    total = sum(weights.values())
    exact = {name: n * w / total for name, w in weights.items()}
    counts = {name: int(x) for name, x in exact.items()}
    order = sorted(weights, key=lambda name: -(exact[name] - counts[name]))
    for name in order[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


# --- the round's prompts ---------------------------------------------------------------


def round_prompts(
    plan: PromptPlan,
    store: RoundStore,
    round_: str,
    load_policy: Callable[[], GenerationEngine] | None = None,
    log: LogFn | None = None,
    sampling: Sampling | None = None,
) -> RoundPrompts:
    """Draw every source's share and assemble them (`assemble`). `load_policy` gives
    the round's policy (self_instruct writes with it; the curriculum measures it, with
    `sampling`, the round's sampling settings)."""
    counts = allocate(plan.n_train, plan.weights)
    parts: list[pl.DataFrame] = []
    mix: list[dict] = []
    notes: dict = {}
    measurements = None
    for name in (s for s in VERIFIABLE if s in plan.weights):
        if name == "curriculum":
            frame, row, measurements = _curriculum(
                plan, counts[name], store, round_, load_policy, sampling or Sampling(), log
            )
        else:
            frame, row = _VERIFIABLE_SOURCES[name](plan, counts[name], store, round_)
        parts.append(frame)
        mix.append({"source": name, "weight": plan.weights[name], **row})
    eval_rows = pl.concat([p.filter(pl.col("split") == "eval") for p in parts])
    candidates = None
    if plan.weights.get("self_instruct", 0) > 0 and counts["self_instruct"] > 0:
        if load_policy is None:
            raise SelfImproveError(
                "self_instruct needs the round's policy to write prompts",
                "pass load_policy (the prompts asset does)",
            )
        frame, candidates, row = _self_instruct(
            plan, counts["self_instruct"], store, round_, eval_rows, load_policy, log
        )
        parts.append(frame)
        mix.append({"source": "self_instruct", "weight": plan.weights["self_instruct"], **row})
    prompts, dropped = assemble(parts)
    # A source mix whose task types the curriculum cannot band stops here, before sampling.
    cur.check_mix(prompts)
    notes["dropped_at_assembly"] = dropped
    notes["contaminated_dropped"] = len(plan.contaminated)
    if plan.contaminated:  # nothing hidden: each dropped row, with the eval prompt it matched
        drops = syn.contamination_candidates(round_, plan.contaminated)
        candidates = (
            drops if candidates is None else pl.concat([candidates, drops], how="diagonal_relaxed")
        )
    mix_frame = pl.DataFrame([{"round": round_, **r} for r in mix], infer_schema_length=None)
    return RoundPrompts(
        prompts,
        candidates,
        mix_frame,
        measurements=measurements,
        notes=notes,
        contaminated=list(plan.contaminated),
    )


def assemble(parts: Sequence[pl.DataFrame]) -> tuple[pl.DataFrame, int]:
    """All sources' rows, eval first. A row whose normalized text another source
    already gave (two sources drawing the same problem, or one's train prompt being
    another's held-out one) is dropped: that is an artefact of mixing. Repeats within
    one source are left in place for the blocking gates on `prompts` to report, since
    they mean the source itself is broken. Returns (table, rows dropped)."""
    frame = pl.concat([p.select(list(PROMPT_SCHEMA)) for p in parts], how="vertical")
    frame = frame.sort(pl.col("split") != "eval", maintain_order=True)
    first_source: dict[str, str] = {}
    keep = []
    for text, source in zip(frame["prompt"], frame["source"], strict=True):
        key = normalize_prompt(text or "")
        keep.append(first_source.setdefault(key, source) == source)
    kept = frame.filter(pl.Series(keep))
    return kept, frame.height - kept.height


def problem_rows(
    round_: str,
    rows: Sequence[tuple[str, str, str]],
    *,
    task: str,
    source: str,
    answer_source: str,
    band: Sequence[int | None] | None = None,
    role: Sequence[str | None] | None = None,
) -> pl.DataFrame:
    """Rows (prompt, answer, split) of a verifiable source in `PROMPT_SCHEMA`."""
    n = len(rows)
    return pl.DataFrame(
        {
            "round": [round_] * n,
            "prompt_id": [prompt_id(p) for p, _, _ in rows],
            "prompt": [p for p, _, _ in rows],
            "answer": [a for _, a, _ in rows],
            "split": [s for _, _, s in rows],
            "task": [task] * n,
            "source": [source] * n,
            "band": list(band) if band is not None else [None] * n,
            "role": list(role) if role is not None else [None] * n,
            "answer_source": [answer_source] * n,
            "answer_verified": [True] * n,
            "origin_round": [None] * n,
            "seed_ids": [[] for _ in range(n)],
            "parent_prompt_ids": [[] for _ in range(n)],
            **{c: [None] * n for c in VERIFIER_COLUMNS},
        },
        schema=PROMPT_SCHEMA,
    )


# --- sources ---------------------------------------------------------------------------


def _task(plan: PromptPlan, n: int, store: RoundStore, round_: str):
    from selfimprove_dagster.sources.tasks import make_task

    if plan.load_problems is not None:
        table = plan.load_problems("task", n)
    else:
        table = make_task(plan.task, n, plan.n_eval, plan.seed)
    rows = list(zip(table["prompt"], table["answer"], table["split"], strict=True))
    name = table["task"][0] if table.height else plan.task
    frame = problem_rows(round_, rows, task=name, source="task", answer_source="generator")
    return _with_verifier_columns(frame, table), _split_counts(frame)


def _dataset(plan: PromptPlan, n: int, store: RoundStore, round_: str):
    from selfimprove_dagster.sources.tasks import load_dataset_file

    if not plan.dataset_path:
        raise SelfImproveError(
            "the `dataset` prompt source has no file", "set SELFIMPROVE_DATASET_PATH"
        )
    if plan.load_problems is not None:
        table = plan.load_problems("dataset", n)
    else:
        table = load_dataset_file(plan.dataset_path, n, plan.n_eval, plan.seed)
    rows = list(zip(table["prompt"], table["answer"], table["split"], strict=True))
    frame = problem_rows(
        round_, rows, task=table["task"][0], source="dataset", answer_source="dataset"
    )
    return _with_verifier_columns(frame, table), _split_counts(frame)


def _with_verifier_columns(frame: pl.DataFrame, table: pl.DataFrame) -> pl.DataFrame:
    """The problem table's verifier columns on its rows (same order) in `frame`."""
    present = [c for c in VERIFIER_COLUMNS if c in table.columns]
    return frame.with_columns(table.select(present)) if present else frame


def _curriculum(
    plan: PromptPlan,
    n: int,
    store: RoundStore,
    round_: str,
    load_policy: Callable[[], GenerationEngine] | None,
    sampling: Sampling,
    log: LogFn | None,
):
    from selfimprove_dagster.sources.tasks import problem_key

    config = plan.curriculum
    if config is None:
        raise SelfImproveError(
            "the `curriculum` prompt source has no task family",
            "set SELFIMPROVE_CURRICULUM_FAMILY (e.g. addition_digits)",
        )
    eval_rows = cur.draw_eval(config, plan.n_eval, plan.seed)
    exclude = {problem_key(p, a) for p, a, _ in eval_rows}
    rates, measured_on, measurements = curriculum_solve_rates(
        config, plan.seed, store, round_, exclude, load_policy, sampling, log
    )
    band, reason = cur.choose_band(
        cur.rates_dict(rates), config.train_bands, config.target, config.start_band
    )
    train_rows = cur.draw_train(config, band, n, plan.seed, round_index(round_), exclude)
    rows = [(p, a, "eval") for p, a, _ in eval_rows] + [
        (p, a, "train") for p, a, _, _ in train_rows
    ]
    frame = problem_rows(
        round_,
        rows,
        task=config.family,
        source="curriculum",
        answer_source="generator",
        band=[b for _, _, b in eval_rows] + [b for _, _, b, _ in train_rows],
        role=[None] * len(eval_rows) + [r for _, _, _, r in train_rows],
    )
    chosen_rate = cur.rates_dict(rates).get(band)
    row = {
        **_split_counts(frame),
        "chosen_band": band,
        "chosen_band_solve_rate": chosen_rate,
        "band_reason": reason,
        "solve_rates": json.dumps(
            {str(r["band"]): round(r["solve_rate"], 4) for r in rates.iter_rows(named=True)}
        ),
        "rates_from_round": previous_round(round_)
        if rates.height and config.measure == cur.MEASURE_PREVIOUS_ROUND
        else None,
        "rates_measured_on": measured_on,
        "train_by_band_role": json.dumps(
            {f"{b}/{r}": c for (b, r), c in _count_band_roles(train_rows).items()}
        ),
        "eval_bands": ",".join(map(str, config.held_out_bands)),
    }
    return frame, row, measurements


def curriculum_solve_rates(
    config: cur.CurriculumConfig,
    seed: int,
    store: RoundStore,
    round_: str,
    exclude: set[object],
    load_policy: Callable[[], GenerationEngine] | None,
    sampling: Sampling,
    log: LogFn | None,
) -> tuple[pl.DataFrame, str | None, pl.DataFrame | None]:
    """(solve rates per band, what they were measured on, the measuring samples).

    measure=policy: the round's policy answers a few problems per band now (round 0
    too, unless a start band is set); the samples table gains `round` and `policy`.
    measure=previous_round: round N−1's critiques."""
    empty = cur.solve_rates(pl.DataFrame(), pl.DataFrame())
    if config.measure == cur.MEASURE_PREVIOUS_ROUND:
        rates = previous_solve_rates(store, round_)
        return rates, f"{previous_round(round_)} generations" if rates.height else None, None
    if round_index(round_) == 0 and config.start_band is not None:
        return empty, None, None
    if load_policy is None:
        raise SelfImproveError(
            "the curriculum measures the round's policy, but no policy was given",
            "pass load_policy (the prompts asset does), or set curriculum measure to "
            "previous_round",
        )
    engine = load_policy()
    try:
        rates, samples = cur.measure_policy(
            engine, config, seed, round_index(round_), exclude, sampling, log
        )
    finally:
        engine.close()
    samples = samples.select(pl.lit(round_).alias("round"), pl.all()).with_columns(
        policy=pl.lit(engine.model_ref)
    )
    return rates, f"policy {engine.model_ref}", samples


def previous_solve_rates(store: RoundStore, round_: str) -> pl.DataFrame:
    """Solve rate per band of round N−1 (empty in round 0 or without its critiques)."""
    parent = previous_round(round_)
    if parent is None or not (store.has(parent, "prompts") and store.has(parent, "critiques")):
        return cur.solve_rates(pl.DataFrame(), pl.DataFrame())
    prompts = store.read(parent, "prompts").filter(pl.col("split") == "train")
    return cur.solve_rates(prompts, store.read(parent, "critiques"))


def synthesized_pool(store: RoundStore, round_: str) -> list[syn.PoolPrompt]:
    """Prompts kept by every earlier round's synthesis, oldest first (their lineage)."""
    pool: list[syn.PoolPrompt] = []
    for index in range(round_index(round_)):
        earlier = round_key(index)
        if store.has(earlier, CANDIDATES_TABLE):
            kept = store.read(earlier, CANDIDATES_TABLE).filter(pl.col("kept"))
            pool += [
                syn.PoolPrompt(pid, instruction, earlier)
                for pid, instruction in kept.select("prompt_id", "instruction").iter_rows()
            ]
    return pool


def _self_instruct(plan, n, store, round_, eval_rows, load_policy, log):
    if plan.synthesis is None:
        raise SelfImproveError(
            "the `self_instruct` prompt source has no settings", "build the plan with synthesis"
        )
    from dataclasses import replace

    seeds = syn.load_seed_tasks(plan.seed_tasks_path)
    pool = synthesized_pool(store, round_)
    config = replace(plan.synthesis, n=n, seed=plan.seed + round_index(round_))
    engine = load_policy()
    try:
        candidates = syn.synthesize(engine, seeds, pool, eval_rows, config, round_, log=log)
    finally:
        engine.close()
    kept = candidates.filter(pl.col("kept"))
    n_kept = kept.height
    frame = pl.DataFrame(
        {
            "round": [round_] * n_kept,
            "prompt_id": kept["prompt_id"],
            "prompt": kept["prompt"],
            "answer": kept["answer"],
            "split": ["train"] * n_kept,
            "task": ["self_instruct"] * n_kept,
            "source": ["self_instruct"] * n_kept,
            "band": [None] * n_kept,
            "role": [None] * n_kept,
            "answer_source": ["ensemble_consensus"] * n_kept,
            "answer_verified": [False] * n_kept,
            "origin_round": [round_] * n_kept,
            "seed_ids": kept["seed_ids"],
            "parent_prompt_ids": kept["parent_prompt_ids"],
            **{c: [None] * n_kept for c in VERIFIER_COLUMNS},
        },
        schema=PROMPT_SCHEMA,
    )
    row = {
        "train_rows": n_kept,
        "eval_rows": 0,
        "requested": n,
        "candidates": candidates.height,
        "dedup_rate": round(syn.dedup_rate(candidates), 4),
        "drop_counts": json.dumps(syn.drop_counts(candidates)),
        "pool_from_earlier_rounds": len(pool),
        "seed_tasks": len(seeds),
    }
    return frame, candidates, row


_VERIFIABLE_SOURCES = {"task": _task, "dataset": _dataset, "curriculum": _curriculum}


def _split_counts(frame: pl.DataFrame) -> dict[str, int]:
    counts = dict(frame.group_by("split").len().iter_rows())
    return {"train_rows": counts.get("train", 0), "eval_rows": counts.get("eval", 0)}


def _count_band_roles(rows) -> dict[tuple[int, str], int]:
    counts: dict[tuple[int, str], int] = {}
    for _, _, band, role in rows:
        counts[(band, role)] = counts.get((band, role), 0) + 1
    return dict(sorted(counts.items()))


# --- what the asset shows ----------------------------------------------------------------


def summary(result: RoundPrompts) -> dict:
    """Scalar metadata of the prompts stage: counts per split and source, the
    curriculum's band and reason, the synthesis's kept / dropped counts and dedup rate."""
    prompts = result.prompts
    splits = dict(prompts.group_by("split").len().iter_rows())
    by_source = dict(
        prompts.filter(pl.col("split") == "train").group_by("source").len().iter_rows()
    )
    out: dict = {
        "train_prompts": splits.get("train", 0),
        "eval_prompts": splits.get("eval", 0),
        "sources": ", ".join(
            f"{r['source']}={r['weight']:g}" for r in result.mix.iter_rows(named=True)
        ),
        "dropped_at_assembly": result.notes.get("dropped_at_assembly", 0),
        "contaminated_dropped": result.notes.get("contaminated_dropped", 0),
        "unverified_train_prompts": prompts.filter(
            (pl.col("split") == "train") & ~pl.col("answer_verified")
        ).height,
    }
    out.update({f"train_prompts_{name}": int(n) for name, n in sorted(by_source.items())})
    for row in result.mix.iter_rows(named=True):
        if row["source"] == "curriculum":
            out.update(
                {
                    k: row[k]
                    for k in (
                        "chosen_band",
                        "chosen_band_solve_rate",
                        "band_reason",
                        "solve_rates",
                        "rates_from_round",
                        "rates_measured_on",
                        "train_by_band_role",
                        "eval_bands",
                    )
                }
            )
        if row["source"] == "self_instruct":
            out.update(
                {
                    "synthesized_kept": row["train_rows"],
                    "synthesized_requested": row["requested"],
                    "synthesis_candidates": row["candidates"],
                    "dedup_rate": row["dedup_rate"],
                    "pool_from_earlier_rounds": row["pool_from_earlier_rounds"],
                    **{f"dropped_{k}": v for k, v in json.loads(row["drop_counts"]).items()},
                }
            )
    return {k: v for k, v in out.items() if v is not None}


def describe(result: RoundPrompts) -> list[str]:
    """Log lines: one per source."""
    lines = []
    for row in result.mix.iter_rows(named=True):
        line = (
            f"{row['source']} (weight {row['weight']:g}): "
            f"{row['train_rows']} train, {row['eval_rows']} eval"
        )
        if row["source"] == "curriculum":
            line += f"; band {row['chosen_band']}: {row['band_reason']}"
            if row.get("rates_measured_on"):
                line += f" [solve rates of {row['rates_measured_on']}]"
        if row["source"] == "self_instruct":
            line += (
                f"; kept {row['train_rows']}/{row['requested']} of {row['candidates']} "
                f"candidates, dedup rate {row['dedup_rate']:.1%}, dropped {row['drop_counts']}"
            )
        lines.append(line)
    return lines


def prompt_status(store: RoundStore, round_: str) -> dict:
    """What `selfimprove status` shows of a round's prompts: the curriculum's band and
    its solve rate in round N−1 (None without a curriculum), synthesized prompts kept."""
    status: dict = {"band": None, "band_solve_rate": None, "synthesized": None}
    if not store.has(round_, MIX_TABLE):
        return status
    for row in store.read(round_, MIX_TABLE).iter_rows(named=True):
        if row["source"] == "curriculum":
            status["band"] = row["chosen_band"]
            status["band_solve_rate"] = row["chosen_band_solve_rate"]
        if row["source"] == "self_instruct":
            status["synthesized"] = row["train_rows"]
    return status
