"""The generation-engine contract every backend implements.

`generate(prompts, n, sampling)` returns `len(prompts) * n` completions, one per
(prompt, sample) pair, in prompt-major order, with token counts and finish reasons.
Prompts are user messages: the engine applies the model's chat template.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

from selfimprove_dagster.progress import LogFn


@dataclass(frozen=True)
class Sampling:
    """How to sample; temperature 0 means greedy decoding."""

    temperature: float = 0.8  # softmax temperature; 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = 50  # sample among the k most likely tokens (0 = off)
    max_new_tokens: int = 32  # completion budget in tokens
    seed: int = 0  # same seed + same inputs = same samples

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class Completion:
    prompt_index: int  # position of the prompt in the `prompts` list
    sample_index: int  # 0..n-1
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-turn token) or "length" (hit max_new_tokens)


class GenerationEngine(ABC):
    """A loaded policy that samples completions for chat prompts."""

    model_ref: str
    # Its samples depend only on the inputs and `sampling.seed`, not on what it generated
    # before; only such engines are kept across steps (`engines.pool`).
    seeded_per_call: bool = True

    @abstractmethod
    def generate(
        self,
        prompts: list[str],
        n: int,
        sampling: Sampling,
        log: LogFn | None = None,
        response_prefix: str = "",
    ) -> list[Completion]:
        """`n` completions per prompt, prompt-major: index = prompt_index * n + sample_index.

        `response_prefix` is text the assistant's reply starts with (e.g. "Score:" to
        make a judge answer in a parseable form); the completion continues after it and
        does not repeat it.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the model (engines that hold a GPU or a server override this)."""


def chat_text(tokenizer, prompt: str) -> str:
    """`prompt` as a user message in the model's chat template, ready for the reply."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def sample_seed(seed: int, prompt: str, sample_index: int) -> int:
    """The seed of one sample: (sampling seed, prompt text, sample index) hashed to 63
    bits. Seeding per sample rather than per call keeps a sample the same whatever else
    is in the call or the batch and whichever worker makes it (engines.ray_pool); two
    equal prompts in one call get the same k samples."""
    key = f"{seed}\x1f{sample_index}\x1f{prompt}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def generation_stats(completions: list[Completion], seconds: float) -> dict[str, float]:
    """What every engine reports in `last_stats` after a `generate` call."""
    new_tokens = sum(c.completion_tokens for c in completions)
    return {
        "rows": len(completions),
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": new_tokens / max(seconds, 1e-9),
    }
