"""Memory of one GRPO step, with and without micro-batches, side by side in one run.

    .venv/bin/python benchmarks/bench_rl_memory.py --data ../shared/data/commonsenseqa

A GRPO step holds the logits of its rollouts (SmolLM2's vocabulary: 49,152 tokens) for
the policy's forward and backward pass and the reference pass. `micro_batch_tokens`
(`training.rl.rl_micro_batch`) splits a step's forward and backward passes; this runs
the same step (the real embedded model, LoRA, one optimizer step of
`--prompts x --generations` rollouts on CommonsenseQA train questions, the answer
format of the round) twice, each in a fresh process so that its peak resident memory
is its own: once with the whole batch in one pass, once under the token budget. Prints
each run's micro-batch, peak RSS (the kernel's `ru_maxrss`) and seconds, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UNSPLIT = 10**9  # a token budget no step reaches: the whole batch in one pass


def one_step(args: argparse.Namespace, budget: int) -> dict:
    """One GRPO optimizer step under `budget` tokens per pass (run in a child process)."""
    from selfimprove_dagster.methods import grpo
    from selfimprove_dagster.models import DEFAULT_MODEL
    from selfimprove_dagster.sources.answer_format import apply_answer_format
    from selfimprove_dagster.sources.datasets import load_commonsenseqa
    from selfimprove_dagster.training import RLParams, TrainParams, train_lora

    problems = load_commonsenseqa(args.data, n_train=args.prompts, n_eval=1, seed=0)
    train = apply_answer_format(problems, args.answer_format).filter(split="train")
    rl = RLParams(
        steps=1,
        prompts_per_step=args.prompts,
        num_generations=args.generations,
        max_completion_length=args.max_completion_length,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as out:
        manifest = train_lora(
            "grpo",
            DEFAULT_MODEL,
            grpo.training_examples(train, train),
            TrainParams(learning_rate=1e-4, rl=rl, micro_batch_tokens=budget),
            Path(out) / "ckpt",
            Path(args.models_dir),
        )
    return {
        "micro_batch": manifest["micro_batch"],
        "batch": rl.batch_size,
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def run_child(budget: int) -> dict:
    command = [sys.executable, __file__, *sys.argv[1:], "--child-budget", str(budget)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the step with budget {budget} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/commonsenseqa")
    parser.add_argument("--models-dir", default="var/models")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--answer-format", default="short", choices=["short", "rationale"])
    parser.add_argument("--budget", type=int, default=2048, help="micro_batch_tokens")
    parser.add_argument("--child-budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_budget is not None:
        print(json.dumps(one_step(args, args.child_budget)))
        return

    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print(
        f"one GRPO step: {args.prompts} CommonsenseQA questions x {args.generations} "
        f"rollouts, <= {args.max_completion_length} new tokens, {args.answer_format} format"
    )
    whole = run_child(UNSPLIT)
    split = run_child(args.budget)
    for name, result in (("whole batch", whole), (f"budget {args.budget}", split)):
        print(
            f"  {name:<14} micro-batch {result['micro_batch']:>3} of {result['batch']}   "
            f"peak RSS {result['peak_rss_gb']:.2f} GB   {result['seconds']:.0f} s"
        )
    print(
        f"  peak RSS ratio (whole / split): {whole['peak_rss_gb'] / split['peak_rss_gb']:.2f}x, "
        f"time ratio (split / whole): {split['seconds'] / whole['seconds']:.2f}x"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
