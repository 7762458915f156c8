"""Ray pool benchmark: samples per second on the same prompts, in one run, for

    one process     the transformers engine in this process (one torch thread)
    1 Ray worker    the Ray pool with one worker (1 CPU)
    2 Ray workers   the Ray pool with two workers on two nodes (1 CPU each)

on a real local Ray cluster (a head and a worker node, 1 CPU each, on loopback).
Ray's start-up (cluster, then each pool's workers loading the model) is timed apart
and excluded from the rates. Targets: 2 workers >= 1.7x 1 worker; 1 worker >= 0.9x
one process. It also counts the completions identical to the one-process run's, and
those of a run sharded into two halves (shards that cut across the engine's batches,
so rows are batched with other rows than in one process). The one-process run is
timed before and after the Ray runs; the best of each configuration counts.

    .venv/bin/python benchmarks/bench_ray.py                       # 64 prompts x 4
    .venv/bin/python benchmarks/bench_ray.py --prompts 128 --repeats 2

With `--rounds N` it compares whole rounds instead: `selfimprove run --rounds N` twice
on the same settings (SELFIMPROVE_* from the environment, e.g. SELFIMPROVE_N_TRAIN),
once in one process (`SELFIMPROVE_POOL=local`) and once with the Ray pool on the local
2-node cluster (`SELFIMPROVE_POOL=ray`), one torch thread everywhere; then the
generations of each round side by side (same rows? identical completions?) and the
held-out accuracy both ways.

    SELFIMPROVE_N_TRAIN=100 SELFIMPROVE_N_EVAL=100 \
        .venv/bin/python benchmarks/bench_ray.py --rounds 2 --work-dir var/bench-ray

Prompts mix two tasks (2-digit addition, word problems) so they differ in length and
batches need padding. Prints the load average before and after: on a shared machine
the ratios hold better than the absolute figures.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from selfimprove_dagster.engines.base import Sampling
from selfimprove_dagster.engines.ray_pool import EngineSpec, RayEnginePool, RaySettings
from selfimprove_dagster.engines.transformers_engine import TransformersEngine
from selfimprove_dagster.models import DEFAULT_MODEL, resolve_model_folder
from selfimprove_dagster.sources.tasks import make_task


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def texts(completions) -> list[str]:
    return [c.text for c in completions]


def identical(a, b) -> float:
    return sum(x == y for x, y in zip(texts(a), texts(b), strict=True)) / len(a)


LOOPBACK_RAY = {
    "RAY_AUTH_MODE": "disabled",  # Ray 2.60 turns token auth on for new clusters
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1, not the node's own IP
}


def start_cluster(connect: bool = True):
    """A head and one worker node, 1 CPU each, on loopback, without token auth."""
    os.environ.update(LOOPBACK_RAY)
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    if connect:
        ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def stop_cluster(cluster, sessions_before: set[str]) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()
    for session in set(glob.glob("/tmp/ray/session_*")) - sessions_before:
        shutil.rmtree(session, ignore_errors=True)
    latest = Path("/tmp/ray/session_latest")
    if latest.is_symlink() and not latest.exists():
        latest.unlink()


def selfimprove(data_dir: Path, env: dict, *args: str) -> str:
    """`selfimprove --data-dir <data_dir> <args>` in a subprocess; its stdout."""
    code = "from selfimprove_dagster.cli import main; raise SystemExit(main())"
    command = [sys.executable, "-c", code, "--data-dir", str(data_dir), *args]
    return subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout


def compare_rounds(args, models_dir: Path) -> None:
    """`selfimprove run --rounds N` in one process, then on the Ray pool; compared."""
    from selfimprove_dagster.store.storage import RoundStore

    work = Path(args.work_dir).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELFIMPROVE_TORCH_THREADS": "1"}
    seconds, status = {}, {}
    for pool in ("local", "ray"):
        data_dir = work / pool
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True)
        (data_dir / "models").symlink_to(models_dir)  # one converted base model
        run_env = {
            **env,
            "SELFIMPROVE_POOL": pool,
            "SELFIMPROVE_DATA_DIR": str(data_dir),
            "DAGSTER_HOME": str(data_dir / "dagster_home"),
        }
        before, cluster = set(glob.glob("/tmp/ray/session_*")), None
        if pool == "ray":
            cluster = start_cluster(connect=False)
            run_env.update(LOOPBACK_RAY, SELFIMPROVE_RAY_ADDRESS=cluster.address)
        try:
            started = time.perf_counter()
            selfimprove(data_dir, run_env, "run", "--rounds", str(args.rounds))
            seconds[pool] = time.perf_counter() - started
            status[pool] = json.loads(selfimprove(data_dir, run_env, "status", "--json"))
        finally:
            if cluster is not None:
                stop_cluster(cluster, before)
        print(f"{pool}: {args.rounds} rounds in {seconds[pool]:.0f} s; {load()}")
    same = ["generation_id", "prompt_id", "sample_index", "prompt", "temperature", "top_p"]
    same += ["top_k", "max_new_tokens", "seed"]
    local, ray_ = RoundStore(work / "local"), RoundStore(work / "ray")
    for one, other in zip(status["local"], status["ray"], strict=True):
        round_ = one["round"]
        a = local.read(round_, "generations").sort("generation_id")
        b = ray_.read(round_, "generations").sort("generation_id")
        rows_same = a.select(same).equals(b.select(same))
        identical = (a["completion"] == b["completion"]).mean()
        print(
            f"{round_}: {a.height} generations, same rows: {rows_same}, identical "
            f"completions: {identical:.1%}; held-out accuracy after: one process "
            f"{one['accuracy_after']:.1%}, Ray pool {other['accuracy_after']:.1%} "
            f"(before: {one['accuracy_before']:.1%} / {other['accuracy_before']:.1%})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts (half each task)")
    parser.add_argument("--samples", type=int, default=4, help="k samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per generate batch")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the best counts")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--models-dir", default="var/models")
    parser.add_argument("--rounds", type=int, default=0, help="compare N whole rounds instead")
    parser.add_argument("--work-dir", default="var/bench-ray", help="--rounds: data dirs")
    args = parser.parse_args()
    if args.rounds:
        models_dir = Path(args.models_dir).resolve()
        resolve_model_folder(args.model, models_dir)  # convert once, for both runs
        compare_rounds(args, models_dir)
        return

    half = args.prompts // 2
    prompts = (
        make_task("addition_2digit", half, 0, seed=0)["prompt"].to_list()
        + make_task("word_problems", args.prompts - half, 0, seed=0)["prompt"].to_list()
    )
    sampling = Sampling(temperature=0.8, top_k=50, max_new_tokens=args.max_new_tokens, seed=0)
    rows = len(prompts) * args.samples
    models_dir = Path(args.models_dir).resolve()
    model = resolve_model_folder(args.model, models_dir)  # convert once, before timing
    print(
        f"{len(prompts)} prompts x {args.samples} samples = {rows} rows, <= "
        f"{args.max_new_tokens} new tokens, batch {args.batch_size}, fp32 CPU, one torch "
        f"thread per engine; {load()}"
    )
    runs: dict[str, list] = {}
    seconds: dict[str, float] = {}

    def run(label: str, engine) -> None:
        engine.generate(prompts[:2], 1, sampling)  # warm-up (first-call allocations)
        for _ in range(args.repeats):
            took, out = timed(lambda: engine.generate(prompts, args.samples, sampling))
            print(f"  {label}: {took:.1f} s; {load()}")
            if label not in seconds or took < seconds[label]:
                seconds[label], runs[label] = took, out

    start_s, local = timed(
        lambda: TransformersEngine(model, models_dir, batch_size=args.batch_size, torch_threads=1)
    )
    run("one process", local)  # again after the Ray runs: the best of both counts
    # Two interleaved halves: the same seeds, but each row batched with other neighbours
    # (other padding) than in one call: where batch composition changes the numerics.
    evens, odds = (local.generate(prompts[i::2], args.samples, sampling) for i in (0, 1))
    k = args.samples
    halves = [
        c
        for i in range(len(prompts))
        for c in (evens if i % 2 == 0 else odds)[(i // 2) * k : (i // 2 + 1) * k]
    ]

    before = set(glob.glob("/tmp/ray/session_*"))
    cluster_s, cluster = timed(start_cluster)
    startup = {"cluster (head + worker node)": cluster_s, "one process: engine load": start_s}
    spec = EngineSpec("transformers", model, str(models_dir), args.batch_size, torch_threads=1)
    try:
        for workers in (1, 2):
            label = f"{workers} Ray worker{'s' if workers > 1 else ''}"

            def start(workers=workers):
                pool = RayEnginePool(spec, RaySettings(workers=workers))
                pool.wait_for_workers()
                return pool

            startup[f"{label}: start + model load"], pool = timed(start)
            nodes = len({info["node_id"] for info in pool.workers.values()})
            try:
                run(label, pool)
            finally:
                pool.close()
            print(f"{label}: {len(runs[label])} rows on {nodes} node(s), {load()}")
    finally:
        stop_cluster(cluster, before)
    run("one process", local)
    local.close()
    print(f"measured; {load()}\n")

    reference = runs["one process"]
    for label, took in seconds.items():
        tokens = sum(c.completion_tokens for c in runs[label])
        print(
            f"{label:<16} {took:7.1f} s  {rows / took:6.2f} samples/s  {tokens / took:6.0f} "
            f"new tokens/s  identical to one process: {identical(runs[label], reference):.1%}"
        )
    print(
        f"{'two halves':<16} (one process, interleaved halves: other batch neighbours)  "
        f"identical to one process: "
        f"{identical(halves, reference):.1%}"
    )
    print("\nstart-up (excluded above):")
    for label, took in startup.items():
        print(f"  {label:<34} {took:6.1f} s")
    one, two, local_s = seconds["1 Ray worker"], seconds["2 Ray workers"], seconds["one process"]
    print(f"\n2 Ray workers vs 1 Ray worker: {one / two:.2f}x (target >= 1.7x)")
    print(f"1 Ray worker vs one process:   {local_s / one:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
