"""Scale benchmark of the record's reads: lineage, the catalog's SQL, catalog refresh and
gc over data dirs of 1, 10 and 100 rounds, built through the project's own publish path.

    .venv/bin/python benchmarks/bench_catalog.py                  # 1, 10, 100 rounds x 100k rows
    .venv/bin/python benchmarks/bench_catalog.py --rows 1000000   # the large case (~11 GB)
    .venv/bin/python benchmarks/bench_catalog.py --rounds 1 5 --rows 20000 --keep /tmp/cat

One data dir grows round by round (measured when it has 1, 10 and 100 rounds). Each
round is what a STaR round writes, with stand-in rows of the real columns: `prompts`
(rows / k prompts), `generations` (`--rows`, k=4 samples a prompt, real
`generation_id`s), `critiques` (one verdict a generation), `filtered` (the ~40%
accepted), a checkpoint folder published behind its link with a manifest as training
writes it (adapter hash, parent and policy identities), the `checkpoints` row, and
`eval_scores` / `eval_details`. Every step goes through `RoundStore.publish` (one
version, atomic, id indexes, catalog links) and is followed by `refresh_catalog()`, as
the round assets do; the refreshes' mean time per round is reported.

At each size, each operation runs in a fresh Python process (what a CLI call pays, imports
included: "process s") and reports its own time ("op s") and the process's peak RSS:
- `lineage <round>`: `checkpoint_lineage(store, last round, limit=10)` (what the CLI
  prints: ten rows and the count);
- `lineage <id>`: a kept row of round_000 (its descendants are every later round) and a
  generation of the last round (`generation_lineage`);
- the docs' SQL through `catalog.connect` (1 GB memory limit): rows and accuracy per round
  over every round's `critiques`, and one round's training rows joined to their
  generations, prompts and checkpoint (docs/data-and-lineage.md);
- `refresh_catalog()` with nothing new, and `collect_garbage(dry_run=True)`;
- with `--heavy`, a user's heavy query (`SQL_HEAVY`: every round's generations joined
  to their critiques) under the same 1 GB limit: it spills to `<data dir>/duckdb_tmp`.
The last lines give the growth per round between the two largest sizes.

With `--status`, each round is also recorded in a Dagster instance in the data dir (one
real in-process run of the demo loop's round job per round, stand-in steps under the
real asset keys with a blocking check each), and `selfimprove status` is timed in a
fresh process: the whole command and the status rows alone.
Targets at 100 rounds x 1M rows on 2 cores: lineage <id> <= 1 s, lineage <round> <= 2 s,
the docs' per-round SQL <= 2 s and <= 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from selfimprove_dagster import ids
from selfimprove_dagster.models import CHECKPOINT_MANIFEST, adapter_sha256, model_ref_identity
from selfimprove_dagster.store.storage import RoundStore, round_key

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id: recorded, never loaded here
K = 4  # samples per prompt
ACCEPT_RATE = 0.4  # share of samples a verifier accepts (the filtered share)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The docs' SQL (docs/data-and-lineage.md), `{round}` filled in.
SQL_PER_ROUND = """
    SELECT round, count(*) AS samples, avg(correct::INTEGER) AS accuracy
    FROM critiques GROUP BY round ORDER BY round
"""
SQL_ROUND_LINEAGE = """
    SELECT f.generation_id, g.policy, g.temperature, p.prompt, f.completion, c.path AS trained
    FROM filtered f
    JOIN generations g ON g.round = f.round AND g.generation_id = f.generation_id
    JOIN prompts p ON p.round = f.round AND p.prompt_id = f.prompt_id
    JOIN checkpoints c ON c.round = f.round
    WHERE f.round = '{round}'
    LIMIT 5
"""

# A heavy user query (`--heavy`): every round's generations joined to their critiques.
SQL_HEAVY = """
    SELECT g.round, count(*) AS samples, avg(c.score) AS mean_score,
           avg(length(g.completion)) AS mean_chars
    FROM generations g
    JOIN critiques c ON c.round = g.round AND c.generation_id = g.generation_id
    GROUP BY g.round ORDER BY g.round
"""


# --- building a data dir through the publish path ------------------------------------------


def _policy(store: RoundStore, index: int) -> str:
    return BASE_MODEL if index == 0 else store.checkpoint_ref(round_key(index - 1))


def _reasoning_pool(rng, size: int = 4000) -> pl.Series:
    """Stand-in reasoning texts (20-60 words of a 3,000-word made-up vocabulary, ~150-400
    characters): completions repeat phrasing as a model's do, but not whole answers, so
    the Parquet files are about as compressible as real ones (not all-dictionary)."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(3000)]
    return pl.Series(
        " ".join(rng.choice(vocabulary, rng.integers(20, 60))) + "." for _ in range(size)
    )


def round_frames(round_: str, rows: int, policy: str, seed: int) -> dict[str, pl.DataFrame]:
    """The tables of one STaR round with `rows` generations (stand-in values, real ids)."""
    rng = np.random.default_rng(seed)
    pool = _reasoning_pool(rng)
    n_prompts = max(1, rows // K)
    a = rng.integers(10, 10_000, n_prompts)
    b = rng.integers(10, 10_000, n_prompts)
    texts = [f"What is {x} + {y}? Answer with just the number." for x, y in zip(a, b, strict=True)]
    prompt_ids = [ids.prompt_id(t) for t in texts]
    prompts = pl.DataFrame(
        {
            "round": round_,
            "prompt_id": prompt_ids,
            "prompt": texts,
            "answer": (a + b).astype(str),
            "split": "train",
            "task": "addition",
        }
    )
    sample = np.tile(np.arange(K), n_prompts)[:rows]
    of = np.repeat(np.arange(n_prompts), K)[:rows]
    correct = rng.random(rows) < ACCEPT_RATE
    sums = (a + b)[of]
    answers = np.where(correct, sums, sums + rng.integers(1, 20, rows))
    generation_ids = [
        ids.generation_id(round_, prompt_ids[p], int(s)) for p, s in zip(of, sample, strict=True)
    ]
    base = pl.DataFrame(
        {
            "generation_id": generation_ids,
            "prompt_id": pl.Series(prompt_ids)[of],
            "sample_index": sample,
            "prompt": pl.Series(texts)[of],
            "answer": answers.astype(str),
            "correct": correct,
            "reasoning": pool.gather(rng.integers(0, len(pool), rows)),
        }
    )
    completion = pl.format("{} So the answer is {}.", pl.col("reasoning"), pl.col("answer"))
    generations = base.select(
        pl.lit(round_).alias("round"),
        "generation_id",
        "prompt_id",
        "sample_index",
        "prompt",
        completion.alias("completion"),
        pl.lit(24).alias("prompt_tokens"),
        pl.lit(6).alias("completion_tokens"),
        pl.lit("stop").alias("finish_reason"),
        pl.lit(policy).alias("policy"),
        pl.lit(0.8).alias("temperature"),
        pl.lit(1.0).alias("top_p"),
        pl.lit(50).alias("top_k"),
        pl.lit(64).alias("max_new_tokens"),
        pl.lit(seed).alias("seed"),
    )
    critiques = base.select(
        pl.lit(round_).alias("round"),
        "generation_id",
        "prompt_id",
        pl.lit("verifier").alias("critic"),
        pl.when("correct").then(pl.lit("accept")).otherwise(pl.lit("reject")).alias("verdict"),
        "correct",
        pl.col("answer").alias("extracted_answer"),
        pl.lit(None, pl.String).alias("reference_answer"),
        pl.when("correct").then(pl.lit("matches")).otherwise(pl.lit("differs")).alias("reason"),
        pl.col("correct").cast(pl.Float64).alias("score"),
    )
    filtered = base.filter("correct").select(
        pl.lit(round_).alias("round"),
        "generation_id",
        "prompt_id",
        "prompt",
        completion.alias("completion"),
        pl.lit("generated").alias("source"),
    )
    return {
        "prompts": prompts,
        "generations": generations,
        "critiques": critiques,
        "filtered": filtered,
    }


def publish_checkpoint(store: RoundStore, index: int, filtered_version: str | None) -> dict:
    """A stand-in adapter published as the round's checkpoint, with the manifest training
    writes (identities by content); returns the `checkpoints` row."""
    round_, policy = round_key(index), _policy(store, index)
    staging = store.checkpoint_staging(round_)
    modules = random.Random(index).sample(TARGET_MODULES, len(TARGET_MODULES))
    config = {"base_model_name_or_path": str(store.models_dir / "base"), "r": 16}
    (staging / "adapter_config.json").write_text(json.dumps(config | {"target_modules": modules}))
    (staging / "adapter_model.safetensors").write_bytes(f"weights of {round_}".encode() * 64)
    trained_from = "../" + round_key(index - 1) if index else BASE_MODEL
    manifest = {
        "round": round_,
        "trained_from": trained_from,
        "parent": model_ref_identity(policy, store.models_dir),
        "policy": policy,
        "parent_round": round_key(index - 1) if index else None,
        "policy_identity": model_ref_identity(policy, store.models_dir),
        "filtered_data_version": filtered_version,
        "adapter_sha256": adapter_sha256(staging),
    }
    (staging / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    version = store.publish_checkpoint(round_, staging)
    return {
        "round": round_,
        "path": str(store.checkpoint_dir(round_)),
        "version": version.name.partition("@")[2],
        "adapter_sha256": manifest["adapter_sha256"],
        "trained_from": trained_from,
        "policy": policy,
        "content_hash": "stand-in",
        "filtered_data_version": filtered_version,
        "train_examples": 0,
        "optimizer_steps": 1,
        "planned_steps": 1,
        "final_loss": 0.5,
    }


def build_round(store: RoundStore, index: int, rows: int) -> list[float]:
    """Publish round `index` step by step, refreshing the catalog after each publish (as
    the assets do). Returns the refreshes' seconds."""
    round_ = round_key(index)
    frames = round_frames(round_, rows, _policy(store, index), seed=index)
    refreshes = []

    def publish(step: str, tables: dict[str, pl.DataFrame]):
        version = store.publish(round_, step, tables, run_id=f"bench-{index}")
        started = time.perf_counter()
        store.refresh_catalog()
        refreshes.append(time.perf_counter() - started)
        return version

    publish("prompts", {"prompts": frames["prompts"]})
    publish("generations", {"generations": frames["generations"]})
    publish("critiques", {"critiques": frames["critiques"]})
    filtered = publish("filtered", {"filtered": frames["filtered"]})
    row = publish_checkpoint(store, index, filtered.data_version)
    publish("checkpoint", {"checkpoints": pl.DataFrame([row])})
    correct = frames["critiques"]["correct"]
    scores = {
        "round": round_,
        "checkpoint": row["path"],
        "policy": row["policy"],
        "accuracy_before": float(correct.mean()),
        "accuracy_after": float(correct.mean()) + 0.01,
        "pass_at_k": 0.9,
        "k": K,
        "n_eval": 200,
        "kept": frames["filtered"].height,
        "kept_fraction": frames["filtered"].height / rows,
    }
    details = frames["critiques"].head(200).select("round", "prompt_id", "correct")
    publish("eval_scores", {"eval_scores": pl.DataFrame([scores]), "eval_details": details})
    return refreshes


def kept_id(store: RoundStore, round_: str) -> str:
    return pl.read_parquet(store.table_path(round_, "filtered"), n_rows=1)["generation_id"][0]


def generation_id_of(store: RoundStore, round_: str) -> str:
    path = store.table_path(round_, "generations")
    return pl.read_parquet(path, n_rows=1)["generation_id"][0]


# --- measuring, one fresh process per operation --------------------------------------------

PROBE = r"""
import json, sys, time
started = time.perf_counter()
from pathlib import Path
from selfimprove_dagster.store import catalog, lineage
from selfimprove_dagster.store.storage import RoundStore
op, data_dir, arg = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
store = RoundStore(data_dir)
t0 = time.perf_counter()
if op == "lineage_round":
    found = lineage.checkpoint_lineage(store, arg, limit=10)
    result = f"{len(found['trained_on'])} of {found['trained_on_count']} rows"
elif op == "lineage_id":
    found = lineage.generation_lineage(store, arg)
    result = f"{len(found['descendant_rounds'])} descendant rounds"
elif op == "sql":
    with catalog.connect(data_dir) as con:
        rows = con.execute(arg).fetchall()
    result = f"{len(rows)} rows"
elif op == "refresh":
    result = store.refresh_catalog().split(":")[0]
elif op == "gc":
    result = f"{len(store.collect_garbage(dry_run=True))} paths"
elif op == "imports":  # the baseline: what importing the store and DuckDB costs
    import duckdb
    result = ""
op_s = time.perf_counter() - t0
# VmHWM: this process's peak RSS (ru_maxrss would count the parent's pages at fork).
status = Path("/proc/self/status").read_text().split("VmHWM:")[1]
rss = int(status.split()[0]) * 1024
print(json.dumps({"op_s": op_s, "rss": rss, "result": result}))
"""


def probe(op: str, data_dir: Path, arg: str = "") -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, op, str(data_dir), arg],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{op} failed:\n{done.stderr[-3000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found | {"process_s": time.perf_counter() - started}


def measure(
    store: RoundStore, rounds: int, refresh_s: list[float], heavy: bool = False
) -> dict[str, dict]:
    last = round_key(rounds - 1)
    results = {
        "imports only (baseline)": probe("imports", store.data_dir),
        "lineage <round>": probe("lineage_round", store.data_dir, last),
        "lineage <id> kept round_000": probe(
            "lineage_id", store.data_dir, kept_id(store, "round_000")
        ),
        "lineage <id> last round": probe(
            "lineage_id", store.data_dir, generation_id_of(store, last)
        ),
        "SQL rows+accuracy per round": probe("sql", store.data_dir, SQL_PER_ROUND),
        "SQL one round's lineage": probe(
            "sql", store.data_dir, SQL_ROUND_LINEAGE.format(round=last)
        ),
        "refresh (nothing new)": probe("refresh", store.data_dir),
        "gc --dry-run": probe("gc", store.data_dir),
    }
    if heavy:
        results["heavy: join all rounds"] = probe("sql", store.data_dir, SQL_HEAVY)
    if refresh_s:
        mean = sum(refresh_s) / len(refresh_s)
        results["refresh after a publish"] = {"op_s": mean, "rss": 0, "process_s": 0, "result": ""}
    return results


STATUS_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
from selfimprove_dagster import cli
cli.use_data_dir(sys.argv[1])
handle = cli.open_loop("demo")
t1 = time.perf_counter()
rows = cli.status_rows(handle)
t2 = time.perf_counter()
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(json.dumps({"load_s": t1 - t0, "op_s": t2 - t1, "rss": int(status.split()[0]) * 1024,
                  "result": f"{len(rows)} rounds, {sum(r['done'] for r in rows)} done"}))
"""


def record_rounds(data_dir: Path, rounds: list[str]) -> float:
    """What Dagster records of `rounds` of the demo loop: one real in-process run of its
    round job per round, with stand-in steps (its six step assets under their real keys,
    a blocking check on each, recording the settings metadata real steps record) against
    the persistent instance in `<data_dir>/dagster_home`. Returns the seconds it took."""
    import dagster as dg

    from selfimprove_dagster import cli
    from selfimprove_dagster.assets import Loop

    cli.use_data_dir(str(data_dir))
    loop = Loop("demo")
    steps = ["prompts", "generations", "critiques", "filtered", "checkpoint", "eval_scores"]
    assets, checks = [], []
    for index, table in enumerate(steps):
        deps = [loop.key(steps[index - 1])] if index else []

        @dg.asset(key=loop.key(table), partitions_def=loop.partitions, deps=deps)
        def stand_in():  # no annotations: this module's are strings (__future__)
            return dg.MaterializeResult(metadata={"selfimprove/settings": "bench"})

        @dg.asset_check(asset=stand_in, name=f"check_{table}", blocking=True,
                        partitions_def=loop.partitions)  # fmt: skip
        def gate():
            return dg.AssetCheckResult(passed=True)

        assets.append(stand_in)
        checks.append(gate)
    job = dg.define_asset_job(loop.job_name, selection=assets)
    defs = dg.Definitions(assets=assets, asset_checks=checks, jobs=[job])
    started = time.perf_counter()
    instance = dg.DagsterInstance.get()
    for round_ in rounds:
        instance.add_dynamic_partitions(loop.partitions.name, [round_])
        resolved = defs.resolve_job_def(loop.job_name)
        assert resolved.execute_in_process(partition_key=round_, instance=instance).success
    return time.perf_counter() - started


def time_status(data_dir: Path) -> dict:
    """`selfimprove status` of the demo loop over `data_dir` (its rounds recorded by
    `record_rounds`), in a fresh process: the whole command (imports, the code location's
    definitions, the record, the tables: "process s") and the status rows alone ("op s")."""
    env = {**os.environ, "SELFIMPROVE_DATA_DIR": str(data_dir)}
    env.pop("SELFIMPROVE_PROFILE", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", STATUS_PROBE, str(data_dir)],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"status failed:\n{done.stderr[-3000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found | {"process_s": time.perf_counter() - started}


# --- report ----------------------------------------------------------------------------------


def _mb(size: int) -> str:
    return f"{size / 2**20:.0f} MB" if size else "-"


def report(table: dict[int, dict[str, dict]], build_s: dict[int, float]) -> None:
    sizes = sorted(table)
    print()
    head = "".join(f"{f'{n} round(s)':>32}" for n in sizes)
    print(f"{'operation':<30}{head}")
    print(f"{'':<30}" + "".join(f"{'op s / process s / peak RSS':>32}" for _ in sizes))
    for name in table[sizes[0]]:
        cells = []
        for n in sizes:
            r = table[n].get(name, {"op_s": 0.0, "process_s": 0, "rss": 0})
            process = f"{r['process_s']:.2f}" if r["process_s"] else "-"
            cells.append(f"{r['op_s']:.3f} / {process} / {_mb(r['rss'])}")
        print(f"{name:<30}" + "".join(f"{c:>32}" for c in cells))
    if len(sizes) >= 2:
        low, high = sizes[-2], sizes[-1]
        print(f"\ngrowth per round from {low} to {high} rounds (op s, peak RSS):")
        for name in (n for n in table[high] if n in table[low]):
            a, b = table[low][name], table[high][name]
            per = (b["op_s"] - a["op_s"]) / (high - low)
            rss = (b["rss"] - a["rss"]) / (high - low)
            print(f"  {name:<30} {per * 1000:+.2f} ms  {rss / 2**20:+.2f} MB")
    if build_s:
        built = ", ".join(f"{n} rounds {s:.0f}" for n, s in build_s.items())
        print(f"\nbuild time (s): {built}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="generations per round")
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 10, 100], help="sizes")
    parser.add_argument("--keep", type=Path, help="build here and keep it (default: temp)")
    parser.add_argument("--heavy", action="store_true", help="also time SQL_HEAVY (slow)")
    parser.add_argument("--measure", type=Path, help="only measure this built data dir")
    parser.add_argument(
        "--status",
        action="store_true",
        help="also record each round in a Dagster instance (a real run of stand-in steps "
        "per round) and time `selfimprove status` over it",
    )
    args = parser.parse_args()
    if args.measure:
        store = RoundStore(args.measure)
        rounds = len(store.round_keys())
        report({rounds: measure(store, rounds, [], args.heavy)}, {})
        return
    data_dir = args.keep or Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    store = RoundStore(data_dir)
    print(f"data dir {data_dir}: {args.rows:,} generations a round, sizes {args.rounds}")
    table, build_s, built, started = {}, {}, 0, time.perf_counter()
    done, recorded = 0, 0.0  # rounds recorded in the Dagster instance (--status)
    refresh_s: list[float] = []
    try:
        for size in sorted(args.rounds):
            while built < size:
                refresh_s = build_round(store, built, args.rows)
                built += 1
                if built % 10 == 0 or built == size:
                    usage = shutil.disk_usage(data_dir)
                    print(f"  built {built} rounds ({time.perf_counter() - started:.0f} s, "
                          f"{usage.free / 2**30:.1f} GiB free)", flush=True)  # fmt: skip
            build_s[size] = time.perf_counter() - started
            table[size] = measure(store, size, refresh_s, args.heavy)
            if args.status:
                recorded += record_rounds(data_dir, [round_key(i) for i in range(done, size)])
                done = size
                table[size]["selfimprove status"] = time_status(data_dir)
            for name, r in table[size].items():
                print(f"  {size:>3} rounds  {name:<30} {r['op_s']:.3f} s  {_mb(r['rss'])}  "
                      f"{r['result']}", flush=True)  # fmt: skip
        report(table, build_s)
    finally:
        if args.keep is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(f"cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
