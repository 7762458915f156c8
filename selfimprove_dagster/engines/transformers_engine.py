"""CPU-default engine: batched `model.generate` from transformers.

Rows (prompt, sample) are sorted by prompt length so a batch pads little, padded on
the left (decoder-only models continue from the last position), and generated in
batches of `batch_size` rows.

Sampling is seeded per sample, not per call or batch: row (prompt, sample s) draws its
randomness from its own stream, seeded by (sampling seed, prompt text, s)
(`base.sample_seed`), through the Gumbel-max trick (`SeededSampler`). So a sample does
not depend on what else is in the call, the batch, or which Ray worker ran it
(`engines.ray_pool`); only the floating point of the model's forward pass can, when a
row is batched with other rows (other padding). `plan()` tells the Ray pool which
prompts share a batch, so it can shard a call along batch boundaries and keep every
batch, and so every completion, as one process makes it.

With k samples per prompt, a batch holds each prompt k times. The prompt's KV cache
is computed once per distinct prompt and copied to its k rows before sampling
(prefix sharing): on CPU the prompt's prefill is most of the work for short answers
(a 46-token chat prompt vs ~12 new tokens), so this makes sampling ~2x faster.
"""

from __future__ import annotations

import time
from pathlib import Path

from selfimprove_dagster.engines.base import (
    Completion,
    GenerationEngine,
    Sampling,
    chat_text,
    generation_stats,
    sample_seed,
)
from selfimprove_dagster.models import load_model, load_tokenizer
from selfimprove_dagster.progress import LogFn, Progress


class TransformersEngine(GenerationEngine):
    def __init__(
        self,
        model_ref: str,
        models_dir: Path,
        batch_size: int = 64,
        torch_threads: int = 0,
        share_prefix: bool = True,
    ) -> None:
        import torch

        if torch_threads > 0:
            # Two threads on two busy cores can be ~10x slower than one: make it a knob.
            torch.set_num_threads(torch_threads)
        self.model_ref = model_ref
        self.batch_size = batch_size
        self.share_prefix = share_prefix  # off only to measure what it saves
        self.tokenizer = load_tokenizer(model_ref, models_dir)
        self.tokenizer.padding_side = "left"
        self.model = load_model(model_ref, models_dir).eval()
        self.last_stats: dict[str, float] = {}

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
        texts = [self.chat_text(p) + response_prefix for p in prompts]
        return self.generate_text(texts, n, sampling, log)

    def plan(self, prompts: list[str], n: int, response_prefix: str = "") -> list[list[int]]:
        """The prompts (indices into `prompts`) of each run of whole batches that
        `generate(prompts, n, ...)` makes, in its order: calling `generate` on one group
        alone, in this order, runs exactly those batches (the Ray pool's shards).

        A group ends where a batch ends with a prompt's last sample: one batch per group
        when `n` divides `batch_size`."""
        texts = [self.chat_text(p) + response_prefix for p in prompts]
        rows = self._row_order(self._prompt_ids(texts), n)
        groups: list[list[int]] = [[]]
        for position, (prompt_index, sample_index) in enumerate(rows):
            if sample_index == 0:
                groups[-1].append(prompt_index)
            if (position + 1) % self.batch_size == 0 and sample_index == n - 1:
                groups.append([])
        return [group for group in groups if group]

    def _prompt_ids(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]

    @staticmethod
    def _row_order(prompt_ids: list[list[int]], n: int) -> list[tuple[int, int]]:
        """Rows (prompt, sample) in generation order: by prompt length (little padding),
        a prompt's samples together (prefix sharing)."""
        rows = [(i, s) for i in range(len(prompt_ids)) for s in range(n)]
        rows.sort(key=lambda row: (len(prompt_ids[row[0]]), row[0], row[1]))
        return rows

    def generate_text(
        self, texts: list[str], n: int, sampling: Sampling, log: LogFn | None = None
    ) -> list[Completion]:
        """`generate` for texts already in the chat template (what /v1/completions gets)."""
        prompt_ids = self._prompt_ids(texts)
        rows = self._row_order(prompt_ids, n)
        results: dict[tuple[int, int], Completion] = {}
        started = time.monotonic()
        with Progress("generate", len(rows), log=log) as progress:
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                seeds = [sample_seed(sampling.seed, texts[i], s) for i, s in batch]
                for completion in self._generate_batch(batch, prompt_ids, sampling, seeds):
                    results[(completion.prompt_index, completion.sample_index)] = completion
                progress.update(len(batch))
        completions = [results[row] for row in sorted(results)]
        self.last_stats = generation_stats(completions, time.monotonic() - started)
        if log:
            stats = self.last_stats
            log(
                f"generated {len(rows)} completions, {stats['new_tokens']} new tokens in "
                f"{stats['seconds']:.1f} s ({stats['tokens_per_s']:.0f} tokens/s)"
            )
        return completions

    def _generate_batch(
        self,
        batch: list[tuple[int, int]],
        prompt_ids: list[list[int]],
        sampling: Sampling,
        seeds: list[int],
    ) -> list[Completion]:
        import torch

        distinct = list(dict.fromkeys(i for i, _ in batch))
        encoded = self.tokenizer.pad(
            {"input_ids": [prompt_ids[i] for i in distinct]}, padding=True, return_tensors="pt"
        )
        row_of = torch.tensor([distinct.index(i) for i, _ in batch])
        shares = self.share_prefix and len(distinct) < len(batch)
        cache = self._shared_prefix_cache(encoded, row_of) if shares else None
        encoded = {name: tensor[row_of] for name, tensor in encoded.items()}
        # Greedy decoding picks the argmax; sampling too, after SeededSampler has added each
        # row's own noise. The model's default sampling flags are silenced (None).
        kwargs: dict = {"max_new_tokens": sampling.max_new_tokens, "do_sample": False}
        kwargs.update(temperature=None, top_p=None, top_k=None)
        if not sampling.greedy:
            kwargs["logits_processor"] = [SeededSampler(seeds, sampling)]
        with torch.inference_mode():
            output = self.model.generate(
                **encoded,
                past_key_values=cache,
                pad_token_id=self.tokenizer.pad_token_id,
                **kwargs,
            )
        new = output[:, encoded["input_ids"].shape[1] :]
        eos_ids = self._stop_token_ids()
        completions = []
        for (prompt_index, sample_index), tokens in zip(batch, new.tolist(), strict=True):
            length = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
            finished = length is not None
            kept = tokens[: length if finished else len(tokens)]
            completions.append(
                Completion(
                    prompt_index=prompt_index,
                    sample_index=sample_index,
                    text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                    prompt_tokens=len(prompt_ids[prompt_index]),
                    completion_tokens=len(kept) + (1 if finished else 0),
                    finish_reason="stop" if finished else "length",
                )
            )
        return completions

    def _shared_prefix_cache(self, encoded: dict, row_of):
        """KV cache of each distinct prompt but its last token, copied to its rows.

        `generate` then only runs the last prompt token and the new tokens. Position ids
        follow the left padding exactly as `generate` computes them, so outputs match
        generating every row from scratch.
        """
        import torch

        input_ids = encoded["input_ids"][:, :-1]
        attention_mask = encoded["attention_mask"][:, :-1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
            )
        cache = out.past_key_values
        cache.batch_select_indices(row_of)
        return cache

    def _stop_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
        return {i for i in ids if i is not None}

    def close(self) -> None:
        self.model = None


class SeededSampler:
    """A logits processor that samples each row from its own random stream.

    Temperature, top-k and top-p shape the scores as transformers' sampling does (same
    warpers, same order); then each kept token gets Gumbel noise and the argmax that
    greedy decoding takes is a sample from the shaped distribution (the Gumbel-max
    trick). The noise of (row, step, token id) is a hash of the row's seed, the step and
    the token id (counter-based, like Philox): it depends on nothing else in the batch,
    and only the tokens top-k / top-p kept are hashed (B x 50 values a step, not B x
    the vocabulary).
    """

    def __init__(self, seeds: list[int], sampling: Sampling) -> None:
        import torch
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.warpers: list = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_k > 0:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.seeds = torch.tensor(seeds, dtype=torch.int64)
        self.step = 0  # generation steps so far (not input length: padding varies)

    def __call__(self, input_ids, scores):
        import torch

        for warp in self.warpers:
            scores = warp(input_ids, scores)
        rows, tokens = torch.isfinite(scores).nonzero(as_tuple=True)
        step = _int64(self.step * _GOLDEN)
        key = self.seeds.to(scores.device)[rows] + step + tokens * _int64_tensor(_TOKEN_STRIDE)
        uniform = _to_unit(_mix64(_mix64(key)))  # float64 in (0, 1)
        self.step += 1
        out = torch.full_like(scores, float("-inf"))
        out[rows, tokens] = scores[rows, tokens] + (-torch.log(-torch.log(uniform))).to(
            scores.dtype
        )
        return out


# 64-bit integer hashing in torch's int64 (wrapping multiplication; logical shifts
# emulated with a mask). Constants: splitmix64's.
_GOLDEN = 0x9E3779B97F4A7C15
_TOKEN_STRIDE = 0xD1B54A32D192ED03
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _int64(value: int) -> int:
    """`value` modulo 2**64 as a signed 64-bit integer."""
    return (value + 2**63) % 2**64 - 2**63


def _int64_tensor(value: int):
    import torch

    return torch.tensor(_int64(value), dtype=torch.int64)


def _shift(z, bits: int):
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z):
    """splitmix64's finalizer: every output bit depends on every input bit."""
    z = (z ^ _shift(z, 30)) * _int64_tensor(_MIX1)
    z = (z ^ _shift(z, 27)) * _int64_tensor(_MIX2)
    return z ^ _shift(z, 31)


def _to_unit(z):
    """The top 53 bits of each value as a float64 strictly inside (0, 1)."""
    import torch

    return (_shift(z, 11).to(torch.float64) + 0.5) / float(2**53)
