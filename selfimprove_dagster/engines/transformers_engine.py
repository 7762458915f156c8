"""CPU-default engine: batched `model.generate` from transformers.

Rows (prompt, sample) are sorted by prompt length so a batch pads little, padded on
the left (decoder-only models continue from the last position), and generated in
batches of `batch_size` rows. Sampling is seeded per batch, so results do not depend
on what ran before in the process.

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

    def generate_text(
        self, texts: list[str], n: int, sampling: Sampling, log: LogFn | None = None
    ) -> list[Completion]:
        """`generate` for texts already in the chat template (what /v1/completions gets)."""
        prompt_ids = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        rows = [(i, s) for i in range(len(texts)) for s in range(n)]
        # By length (little padding), keeping a prompt's samples together (prefix sharing).
        rows.sort(key=lambda row: (len(prompt_ids[row[0]]), row[0], row[1]))
        results: dict[tuple[int, int], Completion] = {}
        started = time.monotonic()
        with Progress("generate", len(rows), log=log) as progress:
            for batch_number, start in enumerate(range(0, len(rows), self.batch_size)):
                batch = rows[start : start + self.batch_size]
                for completion in self._generate_batch(batch, prompt_ids, sampling, batch_number):
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
        batch_number: int,
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
        kwargs: dict = {"max_new_tokens": sampling.max_new_tokens, "do_sample": not sampling.greedy}
        if not sampling.greedy:
            kwargs.update(
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k
            )
            torch.manual_seed(sampling.seed * 100_003 + batch_number)
        else:  # silence "generation flags are not valid" warnings from the model's defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
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
