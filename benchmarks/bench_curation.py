"""Curation benchmark: judge (critique) + filter a round's generations, vectorized path
next to the row-by-row path, in one run.

    .venv/bin/python benchmarks/bench_curation.py                   # 1M numeric rows
    .venv/bin/python benchmarks/bench_curation.py --rows 200000 --code-samples 0

1. Numeric verify + filter over `--rows` synthetic generations of multi-digit addition
   prompts ("What is 4821 + 377?", k=4 samples per prompt). The replies take the shapes
   SmolLM2-135M writes in real runs ("5198", "The answer is 5198.", "4821 + 377 = 5198",
   "... = 5198.\n\nA helpful", "4821 + 377 is 5198 with just the number.",
   "To calculate 4821 + 377, you simply add the two numbers", "**5198**", words around
   a number, no number) around a sum that is right or off by a little; 1% write the
   sum with thousands separators ("5,198"). Numbers vary per prompt, so most
   completions are distinct (the run prints how many): nothing is sped up by repeated
   strings. Two paths on the same frames:
   - vectorized: `star.critique_generations` (Polars expressions, `numeric.verify_frame`)
     then `star.filter_accepted`;
   - row by row: one `numeric.verify` call and one dict per generation, then the same
     filter.
2. Multiple-choice verify over `--mc-rows` generations for CommonsenseQA dev questions
   (../shared/data/commonsenseqa, each question repeated under new prompt ids), replies
   "The answer is (B).", "B) library", "B. library", "**B**", "Answer: B", the option
   text alone, a listed set of options, "I don't know": vectorized
   `star.critique_generations` vs one `multiple_choice.verify_row` per generation.
   Replies without a label go through the Python option-text search in both paths.
3. Code verifier: MBPP reference solutions (../shared/data/mbpp) judged in the sandbox,
   samples/s with 1 worker and with all cores.

The row-by-row paths run on `--row-sample` rows (they are slow) and are reported per
row; their verdicts are compared with the vectorized ones on those rows. Each timing is
the best of `--repeats`. Prints rows/s, the CPU seconds the vectorized run got (all
threads; rows per CPU-second and CPU seconds per 1M rows move less with the load than
rows/s) and CPU/wall (the cores the run got: about 1 on a busy machine, see
`_report`), the ratio, and the load average: other work on the machine moves the
absolute figures (compare runs only at a similar load); the ratio holds better because
both paths run in the same process.
Target: >= 1M rows/s for numeric verify + filter on 2 cores.
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
    """(generations, prompts) of a multi-digit addition round with `rows` generations."""
    rng = random.Random(seed)
    n_prompts = rows // k
    a = [rng.randint(10, 99_999) for _ in range(n_prompts)]
    b = [rng.randint(10, 9_999) for _ in range(n_prompts)]
    prompts = pl.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(n_prompts)],
            "prompt": [
                f"What is {x} + {y}? Answer with just the number."
                for x, y in zip(a, b, strict=True)
            ],
            "answer": [str(x + y) for x, y in zip(a, b, strict=True)],
            "split": ["train"] * n_prompts,
        }
    )
    shapes = [
        "{s}",
        "The answer is {s}.",
        "{a} + {b} = {s}",
        "{a} + {b} = {s}.\n\nA helpful",
        "{a} + {b} = {s}\nYou are welcome.",
        "{a} + {b} is {s} with just the number.",
        "To calculate {a} + {b}, you simply add the two numbers",
        "Here is the step-by-step numerical process to calculate {a} +",
        "**{s}**",
        "Sam has {s} apples now.",
        "I am not sure.",
    ]
    completions, prompt_ids, samples = [], [], []
    for i in range(n_prompts):
        for j in range(k):
            s = a[i] + b[i] + rng.choice([0, 0, 0, 1, -1, 10, -100])
            shape = "{s:,}" if rng.random() < 0.01 else rng.choice(shapes)
            completions.append(shape.format(a=a[i], b=b[i], s=s))
            prompt_ids.append(f"p{i}")
            samples.append(j)
    return _generations(completions, prompt_ids, samples, prompts), prompts


def synthetic_choice_round(
    rows: int, k: int = 4, seed: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(generations, prompts) of a CommonsenseQA round with `rows` generations."""
    path = SHARED_DATA / "commonsenseqa" / "dev.jsonl"
    questions = [json.loads(line) for line in path.open()]
    rng = random.Random(seed)
    n_prompts = rows // k
    picked = [questions[i % len(questions)] for i in range(n_prompts)]
    prompts = pl.DataFrame(
        {
            "prompt_id": [f"q{i}" for i in range(n_prompts)],
            "prompt": [q["prompt"] for q in picked],
            "answer": [q["answer"] for q in picked],
            "split": ["train"] * n_prompts,
            "verifier": ["multiple_choice"] * n_prompts,
            "choices": [json.dumps(q["choices"]) for q in picked],
        }
    )
    shapes = [
        "The answer is ({l}).",
        "{l}) {t}",
        "{l}. {t}",
        "**{l}**",
        "Answer: {l}",
        "{t}",
        "A. {a}\nB. {b}",
        "I don't know",
    ]
    completions, prompt_ids, samples = [], [], []
    for i, q in enumerate(picked):
        for j in range(k):
            label = rng.choice(sorted(q["choices"]))
            completions.append(
                rng.choice(shapes).format(
                    l=label, t=q["choices"][label], a=q["choices"]["A"], b=q["choices"]["B"]
                )
            )
            prompt_ids.append(f"q{i}")
            samples.append(j)
    return _generations(completions, prompt_ids, samples, prompts), prompts


def _generations(
    completions: list[str], prompt_ids: list[str], samples: list[int], prompts: pl.DataFrame
) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "round": ["round_000"] * len(completions),
            "generation_id": [f"g{i}" for i in range(len(completions))],
            "prompt_id": prompt_ids,
            "sample_index": samples,
            "prompt": pl.Series(prompt_ids).replace_strict(prompts["prompt_id"], prompts["prompt"]),
            "completion": completions,
        }
    )


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


def best_of(repeats: int, run) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of all threads, result) of the fastest of `repeats` runs."""
    best, cpu, out = float("inf"), 0.0, None
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        out = run()
        if time.perf_counter() - started < best:
            best, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    return best, cpu, out


def bench_numeric(rows: int, row_sample: int, repeats: int) -> None:
    generations, prompts = synthetic_round(rows)
    sample_gen = generations.head(row_sample)

    def vectorized():
        critiques = star.critique_generations(generations, prompts)
        return critiques, star.filter_accepted(generations, critiques, max_per_prompt=1)

    def row_by_row():
        critiques = row_by_row_critique(sample_gen, prompts)
        return critiques, star.filter_accepted(sample_gen, critiques, max_per_prompt=1)

    fast_s, fast_cpu, (fast_critiques, fast_kept) = best_of(repeats, vectorized)
    slow_s, _, (slow_critiques, _) = best_of(repeats, row_by_row)
    same = (
        fast_critiques.head(row_sample)
        .select("verdict", "extracted_answer", "reason")
        .equals(slow_critiques.select("verdict", "extracted_answer", "reason"))
    )
    distinct = generations["completion"].n_unique()
    print(
        f"numeric verify + filter, {rows:,} generations ({distinct:,} distinct completions,"
        f" {fast_kept.height:,} kept):"
    )
    _report(rows, fast_s, fast_cpu, row_sample, slow_s, same)


def bench_choice(rows: int, row_sample: int, repeats: int) -> None:
    from selfimprove_dagster.verifiers import multiple_choice

    generations, prompts = synthetic_choice_round(rows)
    sample = generations.head(row_sample).join(
        prompts.select("prompt_id", "answer", "choices"), on="prompt_id", maintain_order="left"
    )

    def row_by_row():
        return [
            multiple_choice.verify_row(c, {"answer": a, "choices": ch})
            for c, a, ch in sample.select("completion", "answer", "choices").iter_rows()
        ]

    fast_s, fast_cpu, fast = best_of(
        repeats, lambda: star.critique_generations(generations, prompts)
    )
    slow_s, _, slow = best_of(repeats, row_by_row)
    same = fast.head(row_sample)["extracted_answer"].to_list() == [v.extracted for v in slow]
    print(
        f"multiple-choice verify, {rows:,} generations"
        f" ({generations['completion'].n_unique():,} distinct completions):"
    )
    _report(rows, fast_s, fast_cpu, row_sample, slow_s, same)


def _report(
    rows: int, fast_s: float, fast_cpu: float, row_sample: int, slow_s: float, same: bool
) -> None:
    fast_rate, slow_rate = rows / fast_s, row_sample / slow_s
    print(f"  vectorized (Polars)   {fast_s:7.2f} s   {fast_rate:12,.0f} rows/s")
    # CPU seconds the process got (all threads): on a busy machine wall time is longer.
    # CPU/wall is how many cores the run got, not how many it could use: with the
    # kernel's autogroup scheduling a busy machine hands this process's session about
    # one core however many threads are runnable, so no "rows/s on idle cores" is
    # projected from it.
    print(
        f"    CPU time of that run {fast_cpu:6.2f} s   {rows / fast_cpu:12,.0f} rows per CPU-second"
        f"   CPU/wall {fast_cpu / fast_s:4.2f}"
    )
    print(f"    CPU seconds per 1M rows {fast_cpu / rows * 1e6:5.2f}")
    print(
        f"  row by row (Python)   {slow_s:7.2f} s   {slow_rate:12,.0f} rows/s"
        f"  (on {row_sample:,} rows)"
    )
    print(
        f"  ratio                 {fast_rate / slow_rate:7.1f}x"
        f"   same verdicts on the sample: {same}"
    )
    print(f"  load average now: {os.getloadavg()}")


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
    parser.add_argument("--rows", type=int, default=1_000_000, help="numeric generations")
    parser.add_argument("--mc-rows", type=int, default=200_000, help="multiple-choice ones")
    parser.add_argument("--row-sample", type=int, default=100_000, help="rows for Python")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--code-samples", type=int, default=100, help="0 skips the sandbox")
    args = parser.parse_args()
    print(
        f"load average before: {os.getloadavg()}  cores: {os.cpu_count()}"
        f"  polars threads: {pl.thread_pool_size()}"
    )
    bench_numeric(args.rows, min(args.row_sample, args.rows), args.repeats)
    if args.mc_rows:
        bench_choice(args.mc_rows, min(args.row_sample, args.mc_rows), args.repeats)
    if args.code_samples:
        bench_code(args.code_samples)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
