"""Curation benchmark: critique + filter of a round's generations, side by side in one run.

    .venv/bin/python benchmarks/bench_curation.py                   # 1M rows, 2 repeats
    .venv/bin/python benchmarks/bench_curation.py --rows 200000 --code-samples 64

1. Numeric verify + filter over `--rows` synthetic generations (k=4 per prompt, replies
   in the shapes SmolLM2 writes: "126", "71 + 55 = 126", "The answer is 126.", words
   around a number, no number). Two paths on the same frames:
   - vectorized: `star.critique_generations` (Polars expressions, `numeric.verify_frame`)
     then `star.filter_accepted`;
   - row by row: the critique loop as it was before the vectorized verifiers (one
     `numeric.verify` call and one dict per generation), then the same filter.
   The row-by-row path runs on `--row-sample` rows (it is slow) and is reported per row.
   Target: >= 1M rows/s for the vectorized path on 2 cores.
2. Code verifier: MBPP reference solutions (../shared/data/mbpp) judged in the sandbox,
   samples/s with 1 worker and with all cores.

Prints rows/s, the ratio, and the load average before and after (other work on the
machine moves absolute figures; the ratio holds because both run in the same process).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import polars as pl

from selfimprove_dagster.methods import star
from selfimprove_dagster.verifiers import numeric

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def synthetic_round(rows: int, k: int = 4, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(generations, prompts) of a 2-digit-addition round with `rows` generations."""
    rng = random.Random(seed)
    n_prompts = rows // k
    a = [rng.randint(10, 99) for _ in range(n_prompts)]
    b = [rng.randint(10, 99) for _ in range(n_prompts)]
    prompts = pl.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(n_prompts)],
            "prompt": [
                f"What is {x} + {y}? Answer with just the number."
                for x, y in zip(a, b, strict=True)
            ],
            "answer": [str(x + y) for x, y in zip(a, b, strict=False)],
            "split": ["train"] * n_prompts,
        }
    )
    shapes = [
        "{s}",
        "{a} + {b} = {s}",
        "The answer is {s}.",
        "{a} + {b} = {s}\n\nThis is a classic 2-digit problem",
        "**{s}**",
        "Sam has {s} apples now.",
        "I am not sure.",
    ]
    completions, prompt_ids, samples = [], [], []
    for i in range(n_prompts):
        for j in range(k):
            s = a[i] + b[i] + rng.choice([0, 0, 0, 1, -1, 10])
            completions.append(rng.choice(shapes).format(a=a[i], b=b[i], s=s))
            prompt_ids.append(f"p{i}")
            samples.append(j)
    generations = pl.DataFrame(
        {
            "round": ["round_000"] * len(completions),
            "generation_id": [f"g{i}" for i in range(len(completions))],
            "prompt_id": prompt_ids,
            "sample_index": samples,
            "prompt": pl.Series(prompt_ids).replace_strict(prompts["prompt_id"], prompts["prompt"]),
            "completion": completions,
        }
    )
    return generations, prompts


def row_by_row_critique(generations: pl.DataFrame, prompts: pl.DataFrame) -> pl.DataFrame:
    """The critique step before the vectorized verifiers (kept here as the baseline)."""
    answers = dict(zip(prompts["prompt_id"], prompts["answer"], strict=True))
    rows = []
    for g in generations.iter_rows(named=True):
        reference = answers[g["prompt_id"]]
        verdict = numeric.verify(g["completion"], reference)
        rows.append(
            {
                "round": g["round"],
                "generation_id": g["generation_id"],
                "prompt_id": g["prompt_id"],
                "critic": "verifier",
                "verdict": "accept" if verdict.correct else "reject",
                "correct": verdict.correct,
                "extracted_answer": verdict.extracted,
                "reference_answer": reference,
                "reason": verdict.reason,
                "score": 1.0 if verdict.correct else 0.0,
                "critique": star.verifier_message(verdict, reference),
            }
        )
    return pl.DataFrame(
        rows, schema_overrides={"extracted_answer": pl.String, "reference_answer": pl.String}
    )


def best_of(repeats: int, run) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - started)
    return best, out


def bench_numeric(rows: int, row_sample: int, repeats: int) -> None:
    generations, prompts = synthetic_round(rows)
    sample_gen = generations.head(row_sample)

    def vectorized():
        critiques = star.critique_generations(generations, prompts)
        return critiques, star.filter_accepted(generations, critiques, max_per_prompt=1)

    def row_by_row():
        critiques = row_by_row_critique(sample_gen, prompts)
        return critiques, star.filter_accepted(sample_gen, critiques, max_per_prompt=1)

    fast_s, (fast_critiques, fast_kept) = best_of(repeats, vectorized)
    slow_s, (slow_critiques, _) = best_of(repeats, row_by_row)
    same = (
        fast_critiques.head(row_sample)
        .select("verdict", "extracted_answer")
        .equals(slow_critiques.select("verdict", "extracted_answer"))
    )
    fast_rate, slow_rate = rows / fast_s, row_sample / slow_s
    print(f"numeric verify + filter, {rows:,} generations ({fast_kept.height:,} kept):")
    print(f"  vectorized (Polars)   {fast_s:7.2f} s   {fast_rate:12,.0f} rows/s")
    print(
        f"  row by row (Python)   {slow_s:7.2f} s   {slow_rate:12,.0f} rows/s"
        f"  (on {row_sample:,} rows)"
    )
    print(
        f"  ratio                 {fast_rate / slow_rate:7.1f}x"
        f"   same verdicts on the sample: {same}"
    )


def bench_code(samples: int) -> None:
    from selfimprove_dagster.verifiers.code import verify_rows
    from selfimprove_dagster.verifiers.sandbox import default_workers

    path = SHARED_DATA / "mbpp" / "test.jsonl"
    records = [json.loads(line) for line in path.open()][:samples]
    rows = [
        {"answer": r["code"], "tests": r["test_list"], "test_setup": r["test_setup_code"]}
        for r in records
    ]
    completions = [f"```python\n{r['code']}\n```" for r in records]
    print(f"code verifier, {len(rows)} MBPP reference solutions in the sandbox:")
    for workers in sorted({1, default_workers()}):
        started = time.perf_counter()
        verdicts = verify_rows(completions, rows, workers=workers)
        seconds = time.perf_counter() - started
        passed = sum(v.correct for v in verdicts)
        print(
            f"  {workers} worker(s)   {seconds:6.2f} s   {len(rows) / seconds:6.1f} samples/s   "
            f"({passed}/{len(rows)} pass)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--row-sample", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--code-samples", type=int, default=100)
    args = parser.parse_args()
    print(
        f"load average before: {os.getloadavg()}  cores: {os.cpu_count()}"
        f"  polars threads: {pl.thread_pool_size()}"
    )
    bench_numeric(args.rows, min(args.row_sample, args.rows), args.repeats)
    if args.code_samples:
        bench_code(args.code_samples)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
