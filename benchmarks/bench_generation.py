"""Generation benchmark: the project's transformers engine vs a raw `model.generate`
loop on the same prompts, batches and sampling settings, measured side by side.

    .venv/bin/python benchmarks/bench_generation.py [--prompts 128] [--samples 4]

Prints seconds, new tokens/s and the ratios (engine with prefix sharing, engine
without it, raw generate). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from selfimprove_dagster.engines.base import Sampling
from selfimprove_dagster.engines.transformers_engine import TransformersEngine
from selfimprove_dagster.models import DEFAULT_MODEL
from selfimprove_dagster.tasks import make_task


def raw_generate(engine: TransformersEngine, prompts: list[str], n: int, sampling: Sampling):
    """The baseline: one left-padded `generate` call per batch of rows, no sorting."""
    import torch

    tokenizer, model = engine.tokenizer, engine.model
    texts = [engine.chat_text(p) for p in prompts for _ in range(n)]
    new_tokens = 0
    for start in range(0, len(texts), engine.batch_size):
        batch = tokenizer(
            texts[start : start + engine.batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        torch.manual_seed(sampling.seed + start)
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=True,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                pad_token_id=tokenizer.pad_token_id,
            )
        generated = out[:, batch["input_ids"].shape[1] :]
        new_tokens += int((generated != tokenizer.pad_token_id).sum())
    return new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models-dir", default="var/models")
    args = parser.parse_args()

    prompts = make_task("addition_2digit", args.prompts, 0, seed=0)["prompt"].to_list()
    sampling = Sampling(temperature=0.8, top_k=50, max_new_tokens=args.max_new_tokens, seed=0)
    engine = TransformersEngine(DEFAULT_MODEL, Path(args.models_dir), batch_size=args.batch_size)
    engine.generate(prompts[:4], 1, sampling)  # warm-up

    results = {}
    for label, share in (("engine (prefix sharing)", True), ("engine (no sharing)", False)):
        engine.share_prefix = share
        started = time.perf_counter()
        out = engine.generate(prompts, args.samples, sampling)
        results[label] = (time.perf_counter() - started, sum(c.completion_tokens for c in out))
    started = time.perf_counter()
    tokens = raw_generate(engine, prompts, args.samples, sampling)
    results["raw model.generate"] = (time.perf_counter() - started, tokens)

    rows = args.prompts * args.samples
    print(
        f"{args.prompts} prompts x {args.samples} samples = {rows} rows, "
        f"{args.max_new_tokens} new tokens max, batch {args.batch_size}"
    )
    for label, (seconds, tokens) in results.items():
        print(
            f"{label:<26} {seconds:7.1f} s  {rows / seconds:6.1f} rows/s  "
            f"{tokens / seconds:6.0f} new tokens/s"
        )
    raw = results["raw model.generate"][0]
    for label in ("engine (prefix sharing)", "engine (no sharing)"):
        print(f"speed-up of {label} over raw model.generate(): {raw / results[label][0]:.2f}x")


if __name__ == "__main__":
    main()
