"""Which problems a round trains on, where they come from, how the held-out set is scored."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import dagster as dg
import polars as pl
from pydantic import Field

from selfimprove_dagster.errors import SelfImproveError


class TaskResource(dg.ConfigurableResource):
    """Which problems the loop trains on and how the held-out set is scored."""

    task: str = Field(
        default="addition_2digit",
        description="Built-in task (addition_2digit, word_problems); ignored with dataset_path.",
    )
    dataset_path: str = Field(
        default="",
        description="A .jsonl/.parquet file (prompt+answer, GSM8K, multiple choice, MATH, "
        "MBPP, HumanEval; docs/tasks-and-verifiers.md), or a folder with train.jsonl and "
        "dev/test.jsonl (e.g. ../shared/data/commonsenseqa).",
    )
    verifier: str = Field(
        default="",
        description="Verifier of rows without a `verifier` column: numeric, multiple_choice, "
        "math, code or module:function ('' = the one the file's layout implies).",
    )
    answer_format: str = Field(
        default="short",
        description="short (just the answer) or rationale (reason step by step, then a final "
        "'Answer: X' line; also raises the generator's token budget, see GeneratorResource).",
    )
    drop_contaminated: bool = Field(
        default=False,
        description="Drop dataset train rows that near-duplicate an eval row at load time "
        "(each logged with the eval row it matched) instead of blocking the round.",
    )
    n_train: int = Field(default=200, ge=1, description="Train prompts sampled each round.")
    n_eval: int = Field(default=200, ge=1, description="Held-out prompts (never trained on).")
    seed: int = Field(default=0, description="Seed of the problem draw and split.")
    eval_samples_per_prompt: int = Field(
        default=4, description="k for held-out pass@k (0 = greedy accuracy only)."
    )
    pass_at_k_prompts: int = Field(
        default=50, description="Held-out prompts sampled k times for pass@k."
    )
    # Where prompts come from (selfimprove_dagster.sources.mix).
    sources: list[str] = Field(
        default=[],
        description="Prompt sources with weights, e.g. curriculum=0.7,self_instruct=0.3 "
        "(task, dataset, curriculum, self_instruct; weight 0 = held-out set only). "
        "Empty: dataset if dataset_path is set, else task.",
    )
    min_prompt_chars: int = Field(
        default=8, description="Shortest prompt the prompts checks accept (characters)."
    )
    max_prompt_chars: int = Field(
        default=2000, description="Longest prompt the prompts checks accept (characters)."
    )
    curriculum_family: str = Field(
        default="addition_digits",
        description="curriculum: task family (addition_digits: band = digits 1-4; "
        "addition_operands: band = 2-4 two-digit operands).",
    )
    curriculum_bands: list[int] = Field(
        default=[], description="curriculum: bands it may train on (empty: all)."
    )
    curriculum_eval_bands: list[int] = Field(
        default=[], description="curriculum: bands of the fixed held-out set (empty: hardest)."
    )
    curriculum_target: float = Field(
        default=0.5, description="curriculum: train on the band whose solve rate is closest."
    )
    curriculum_replay: float = Field(
        default=0.2, description="curriculum: share of train prompts replayed from easier bands."
    )
    curriculum_probe: int = Field(
        default=8, description="curriculum: train prompts from every other band (measures it)."
    )
    curriculum_start_band: int = Field(
        default=0,
        description="curriculum: round 0's band (0 = measured with measure=policy, else the "
        "easiest).",
    )
    curriculum_measure: Literal["policy", "previous_round"] = Field(
        default="policy",
        description="curriculum: where solve rates come from: policy (the round's policy "
        "answers a few problems per band first) or previous_round (round N-1's critiques).",
    )
    curriculum_measure_per_band: int = Field(
        default=16, description="curriculum, measure=policy: problems per band."
    )
    curriculum_measure_samples: int = Field(
        default=4, description="curriculum, measure=policy: samples per problem."
    )
    seed_tasks_path: str = Field(
        default="../shared/data/self_instruct/seed_tasks.jsonl",
        description="self_instruct: Self-Instruct seed tasks (jsonl: instruction, instances).",
    )
    synth_seeds_per_prompt: int = Field(
        default=4, description="self_instruct: seed tasks shown per request."
    )
    synth_pool_per_prompt: int = Field(
        default=2, description="self_instruct: earlier synthesized prompts shown per request."
    )
    synth_ensemble: int = Field(
        default=4, description="self_instruct: answers sampled per new prompt (consensus)."
    )
    synth_min_agreement: float = Field(
        default=0.5, description="self_instruct: least consensus agreement (mean ROUGE-L)."
    )
    synth_dedup_threshold: float = Field(
        default=0.7, description="self_instruct: ROUGE-L above which a candidate is a duplicate."
    )
    synth_min_words: int = Field(default=3, description="self_instruct: shortest task (words).")
    synth_max_words: int = Field(default=60, description="self_instruct: longest task (words).")
    synth_temperature: float = Field(
        default=0.7, description="self_instruct: sampling temperature of new tasks."
    )
    synth_max_new_tokens: int = Field(
        default=64, description="self_instruct: token budget of a new task."
    )
    synth_passes: int = Field(
        default=3, description="self_instruct: passes (later ones see earlier ones' prompts)."
    )
    synth_oversample: float = Field(
        default=3.0, description="self_instruct: requests per missing prompt in a pass."
    )

    def plan(self, max_new_tokens: int = 16, contamination_threshold: float = 0.9):
        """The prompts stage's settings (`prompt_sources.PromptPlan`), validated."""
        from selfimprove_dagster.engines.base import Sampling
        from selfimprove_dagster.sources.curriculum import CurriculumConfig
        from selfimprove_dagster.sources.mix import PromptPlan, parse_mix
        from selfimprove_dagster.sources.synthesis import SynthesisConfig

        weights = parse_mix(self.sources or ["dataset" if self.dataset_path else "task"])
        curriculum = None
        if "curriculum" in weights:
            curriculum = CurriculumConfig(
                family=self.curriculum_family,
                bands=tuple(self.curriculum_bands),
                eval_bands=tuple(self.curriculum_eval_bands),
                target=self.curriculum_target,
                replay_fraction=self.curriculum_replay,
                probe_per_band=self.curriculum_probe,
                start_band=self.curriculum_start_band or None,
                measure=self.curriculum_measure,
                measure_per_band=self.curriculum_measure_per_band,
                measure_samples=self.curriculum_measure_samples,
            )
        synthesis = None
        if "self_instruct" in weights:
            synthesis = SynthesisConfig(
                n=0,  # set per round from the weights
                seeds_per_prompt=self.synth_seeds_per_prompt,
                synthesized_per_prompt=self.synth_pool_per_prompt,
                oversample=self.synth_oversample,
                max_passes=self.synth_passes,
                ensemble_samples=self.synth_ensemble,
                min_agreement=self.synth_min_agreement,
                dedup_threshold=self.synth_dedup_threshold,
                min_words=self.synth_min_words,
                max_words=self.synth_max_words,
                contamination_threshold=contamination_threshold,
                task_sampling=Sampling(
                    temperature=self.synth_temperature,
                    top_p=0.9,
                    top_k=0,
                    max_new_tokens=self.synth_max_new_tokens,
                ),
                answer_sampling=Sampling(temperature=0.7, top_k=50, max_new_tokens=max_new_tokens),
            )
            if not Path(self.seed_tasks_path).is_file():
                raise SelfImproveError(
                    f"seed task file {self.seed_tasks_path} does not exist",
                    "set SELFIMPROVE_SEED_TASKS_PATH to Self-Instruct's seed_tasks.jsonl",
                )
        # Dataset train rows dropped as contaminated land in this list (recorded in the
        # round's prompt_candidates by `round_prompts`).
        contaminated: list[dict] = []
        return PromptPlan(
            weights=weights,
            n_train=self.n_train,
            n_eval=self.n_eval,
            seed=self.seed,
            task=self.task,
            dataset_path=self.dataset_path,
            curriculum=curriculum,
            synthesis=synthesis,
            seed_tasks_path=self.seed_tasks_path,
            load_problems=self.problem_loader(contaminated if self.drop_contaminated else None),
            contaminated=contaminated,
        )

    def problem_loader(
        self, dropped: list[dict] | None = None
    ) -> Callable[[str, int], pl.DataFrame]:
        """How the `task` / `dataset` prompt source gets its table for n train rows.
        Without `sources` the round's prompts are `problems()` (the hook a subclass may
        override); with `sources` each source's share is loaded by `source_problems`, so
        a dataset in a mix keeps its verifier, answer format and contamination drops."""
        if not self.sources:
            return lambda source, n: self.problems() if dropped is None else self.problems(dropped)
        return lambda source, n: self.source_problems(source, n, dropped)

    def problems(self, dropped: list[dict] | None = None) -> pl.DataFrame:
        """The round's problems (without `sources`: the dataset if one is set, else the
        built-in task) in the answer format; contaminated train rows dropped with
        `drop_contaminated` are appended to `dropped` (and logged)."""
        self.plan()  # validates the prompt sources before anything runs (CLI preflight)
        source = "dataset" if self.dataset_path else "task"
        return self.source_problems(source, self.n_train, dropped)

    def source_problems(
        self, source: str, n_train: int, dropped: list[dict] | None = None
    ) -> pl.DataFrame:
        """The `task` or `dataset` source's table with `n_train` train rows, in the
        answer format, with the `verifier` override and `drop_contaminated` applied."""
        from selfimprove_dagster.sources.answer_format import apply_answer_format, check_format
        from selfimprove_dagster.sources.tasks import load_dataset_file, make_task

        check_format(self.answer_format)
        if source == "dataset":
            dropped = [] if dropped is None else dropped
            table = load_dataset_file(
                self.dataset_path,
                n_train,
                self.n_eval,
                self.seed,
                verifier=self.verifier or None,
                drop_contaminated=self.drop_contaminated,
                dropped=dropped,
            )
            for row in dropped:
                dg.get_dagster_logger().warning(
                    f"dropped contaminated train row {row['prompt'][:80]!r}: {row['match']} "
                    f"match ({row['similarity']}) of eval row {row['eval_prompt'][:80]!r}"
                )
        else:
            table = make_task(self.task, n_train, self.n_eval, self.seed)
        return apply_answer_format(table, self.answer_format)
