"""Sampling fanned out over a Ray cluster: one engine per Ray actor, a step's prompts
sharded over them, and a worker lost mid-step costs a retry, not rows.

    Dagster step (the driver)                     Ray cluster
    RayEnginePool.generate(prompts, n, sampling)
      plan: which prompts share a batch  ───────> a worker: engine.plan(prompts, n)
      shards = whole engine batches, queued
      two shards in flight per worker    ───────> EngineWorker x W (SPREAD over nodes),
                                                  each holding one engine (transformers
                                                  on CPU, vLLM on a GPU) built on its node
      completions keyed (prompt, sample) <───────
      a worker lost (node gone, process killed): its shards go back to the queue and
      a replacement worker is asked for; each shard's result is kept once

A pool starts its W workers and begins as soon as one has loaded the model; the others
join as they load, so a step never waits on a worker the cluster has no room for yet.

The same rows whatever the workers: the transformers engine seeds each sample by
(seed, prompt, sample index), not per call, and `plan()` gives its batches, so a shard
is one or more of the batches one process would run, with the same rows in it: one
process, one Ray worker and several nodes give the same completions, given the same
torch thread count and CPU kind. Engines without a plan (vLLM) are split into
2 x workers contiguous shards; their samples follow their own seeding.

What reaches the workers: the engine's settings and the model reference, never
weights. A worker loads the model from the path it is given, so the data dir (the
converted base model under `models/`, every round's checkpoint chain) must sit on
storage every Ray node mounts at the same path; on one machine it does. The project
must be installed in the workers' Python (the cluster's image), like `ray` itself.

Ray is imported inside functions: without the `[ray]` extra this module imports, and
asking for a pool raises a `SelfImproveError` naming the extra. The driver must be
connected to Ray first (`resources/ray.py` connects through dagster-ray).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from selfimprove_dagster.engines.base import Completion, GenerationEngine, Sampling
from selfimprove_dagster.engines.openai_engine import OpenAISettings
from selfimprove_dagster.engines.vllm_engine import VllmSettings
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.progress import LogFn, Progress

RAY_EXTRA_FIX = (
    "install the Ray extra: pip install -e '.[ray]' (`make install` does), or sample in "
    "this process with SELFIMPROVE_POOL=local"
)
IN_FLIGHT_PER_WORKER = 2  # shards queued at a worker: the next one waits there, not here


@dataclass(frozen=True)
class EngineSpec:
    """What a worker builds its engine from: `make_engine`'s arguments, picklable."""

    engine: str  # transformers, vllm (openai needs no Ray: see `check_engine`)
    model_ref: str  # embedded:<name>, a model folder or a round checkpoint (a path)
    models_dir: str  # the data dir's models/ (converted base models, merged weights)
    batch_size: int = 64  # rows per generate() batch
    torch_threads: int = 1  # torch threads of each worker (its CPUs)
    vllm: VllmSettings | None = None
    openai: OpenAISettings | None = None

    def build(self) -> GenerationEngine:
        from selfimprove_dagster.engines import make_engine

        return make_engine(
            self.engine,
            self.model_ref,
            Path(self.models_dir),
            batch_size=self.batch_size,
            torch_threads=self.torch_threads,
            vllm=self.vllm,
            openai=self.openai,
        )


@dataclass(frozen=True)
class RaySettings:
    """How many workers, what each asks of the cluster, how hard to retry."""

    workers: int = 0  # engine actors (0 = as many as the cluster's CPUs, or GPUs, allow)
    cpus_per_worker: float = 1.0  # CPUs each actor reserves (its torch threads)
    gpus_per_worker: float = 0.0  # GPUs each actor reserves (1 for a vLLM engine)
    max_retries: int = 3  # further tries of one shard after the worker running it was lost
    start_timeout_s: float = 300.0  # longest wait for a worker to load its engine


def check_engine(engine: str) -> None:
    """Refuse engines the Ray pool does not run (with the fix)."""
    if engine == "openai":
        raise SelfImproveError(
            "The openai engine sends its requests from the step to the server fleet, which "
            "is already the parallel part: a Ray pool in front of it adds nothing",
            "use SELFIMPROVE_POOL=local with the openai engine (raise "
            "SELFIMPROVE_OPENAI_MAX_CONCURRENCY for a larger fleet), or run the model on "
            "the Ray cluster with SELFIMPROVE_ENGINE=vllm (GPU workers) or transformers",
        )


def require_ray():
    """The `ray` module, or the error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise SelfImproveError(
            "The Ray pool (SELFIMPROVE_POOL=ray) needs Ray, which is not installed here",
            RAY_EXTRA_FIX,
        ) from None
    return ray


def _lost_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for work lost with its worker (not raised by the engine's code)."""
    from ray import exceptions

    return (
        exceptions.RayActorError,  # the actor died or is unreachable (node removed, SIGKILL)
        exceptions.WorkerCrashedError,
        exceptions.NodeDiedError,
        exceptions.ObjectLostError,
    )


class WorkerFailed(Exception):
    """A `SelfImproveError` raised on a worker, carried back as (problem, fix): the
    error's own constructor does not survive pickling."""


class EngineWorker:
    """One Ray actor's state: an engine built on the actor's node from `spec`.

    A failure to build it is kept and reported by `info()` (an exception raised in an
    actor's constructor reaches the driver only as text)."""

    def __init__(self, spec: EngineSpec) -> None:
        os.environ.setdefault("TQDM_DISABLE", "1")  # progress is the driver's to show
        started = time.monotonic()
        self.engine: GenerationEngine | None = None
        self.failure: tuple[str, str] | None = None
        try:
            path = Path(spec.model_ref).expanduser()
            if not spec.model_ref.startswith("embedded:") and not path.exists():
                import socket

                raise SelfImproveError(
                    f"Model {spec.model_ref} is not on Ray node {socket.gethostname()}",
                    "put the data dir on storage that every Ray node mounts at the same "
                    "path as the Dagster step (a ReadWriteMany volume, NFS); see "
                    "docs/engines-and-deployment.md, Ray",
                )
            self.engine = spec.build()
        except SelfImproveError as error:
            self.failure = (error.problem, error.fix)
        except Exception as error:  # reported by info(), with where it happened
            self.failure = (
                f"A Ray worker could not load {spec.model_ref}: {type(error).__name__}: {error}",
                "check that the workers' image has the same project and libraries as the step",
            )
        self.load_seconds = time.monotonic() - started

    def info(self) -> dict:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "load_seconds": self.load_seconds,
            "failure": self.failure,
            "seeded_per_call": self.engine.seeded_per_call if self.engine else True,
        }

    def plan(self, prompts: list[str], n: int, response_prefix: str) -> list[list[int]] | None:
        plan = getattr(self.engine, "plan", None)
        return plan(prompts, n, response_prefix) if plan else None

    def generate(
        self, prompts: list[str], n: int, sampling: Sampling, response_prefix: str
    ) -> list[Completion]:
        extra = {"response_prefix": response_prefix} if response_prefix else {}
        try:
            return self.engine.generate(prompts, n, sampling, **extra)
        except SelfImproveError as error:
            raise WorkerFailed(error.problem, error.fix) from None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class RayEnginePool(GenerationEngine):
    """A `GenerationEngine` whose `generate` runs on `settings.workers` Ray actors."""

    def __init__(self, spec: EngineSpec, settings: RaySettings | None = None) -> None:
        check_engine(spec.engine)
        ray = require_ray()
        if not ray.is_initialized():
            raise SelfImproveError(
                "The Ray pool was asked for before this process connected to Ray",
                "connect first (resources/ray.py `connect`, or ray.init(address=...))",
            )
        self.spec, self.settings = spec, settings or RaySettings()
        self.model_ref = spec.model_ref
        self.address = ray.get_runtime_context().gcs_address
        if spec.model_ref.startswith("embedded:"):
            # Convert the embedded model once, here, into the shared models dir: workers
            # on one node would otherwise race to write the same folder.
            from selfimprove_dagster.models import resolve_model_folder

            self.spec = replace(
                spec, model_ref=resolve_model_folder(spec.model_ref, Path(spec.models_dir))
            )
        self.actor_class = ray.remote(EngineWorker).options(
            num_cpus=self.settings.cpus_per_worker,
            num_gpus=self.settings.gpus_per_worker,
            max_restarts=0,  # a lost worker is replaced by the pool (its shards re-queued)
            max_task_retries=0,
            scheduling_strategy="SPREAD",  # one per node while nodes have room
        )
        self.workers: dict = {}  # live actor -> its info (node, pid, load seconds)
        self.starting: dict = {}  # started actor, not loaded yet -> its info() ref
        self.lost = 0  # workers lost since the pool started
        self.last_stats: dict[str, float] = {}
        started = time.monotonic()
        try:
            self._start(self.worker_count())
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - started
        self.seeded_per_call = all(i["seeded_per_call"] for i in self.workers.values())

    # -- workers --------------------------------------------------------------------

    def worker_count(self) -> int:
        """`settings.workers`, or as many as the cluster's CPUs (GPUs) hold."""
        if self.settings.workers > 0:
            return self.settings.workers
        import ray

        total = ray.cluster_resources()
        if self.settings.gpus_per_worker > 0:
            fits = total.get("GPU", 0) // self.settings.gpus_per_worker
        else:
            fits = total.get("CPU", 0) // max(self.settings.cpus_per_worker, 1e-9)
        return max(1, int(fits))

    def _start(self, count: int) -> None:
        """Start `count` workers and wait until one has loaded its engine; the others
        join as they load (`_admit_started`), so a step never waits for a worker the
        cluster has no room for yet (an autoscaler may add it)."""
        for _ in range(count):
            self._replace()
        self._admit_started(wait_s=self.settings.start_timeout_s, until=1)
        if not self.workers:
            raise SelfImproveError(
                f"No Ray worker could start within {self.settings.start_timeout_s:.0f} s on "
                f"the cluster at {self.address} (each asks for "
                f"{self.settings.cpus_per_worker:g} CPU, {self.settings.gpus_per_worker:g} GPU; "
                f"the cluster has {_resources_line()})",
                "add nodes, or lower SELFIMPROVE_RAY_CPUS_PER_WORKER / "
                "SELFIMPROVE_RAY_GPUS_PER_WORKER, or raise SELFIMPROVE_RAY_START_TIMEOUT_S",
            )

    def wait_for_workers(self, timeout_s: float | None = None) -> int:
        """Wait until every started worker has joined (benchmarks and tests; a step
        does not wait); returns how many workers are live."""
        wait = self.settings.start_timeout_s if timeout_s is None else timeout_s
        self._admit_started(wait_s=wait, until=len(self.starting) + len(self.workers))
        return len(self.workers)

    @staticmethod
    def _get(ref):
        """`ray.get`, with an engine's own exception raised as itself rather than
        wrapped in a RayTaskError (a `SelfImproveError` comes back as one)."""
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, WorkerFailed):
                raise SelfImproveError(*error.cause.args) from None
            raise error.as_instanceof_cause() from None

    def _lose(self, actor, log: LogFn | None, error: BaseException) -> None:
        """Drop a lost worker and ask for a replacement (it joins once it has loaded)."""
        info = self.workers.pop(actor, None)
        if info is None:
            return  # already dropped (its other in-flight shard failed first)
        self.lost += 1
        if log:
            log(
                f"ray: worker on node {info['node_id'][:8]} (pid {info['pid']}) lost "
                f"({type(error).__name__}); its shards go back to the queue"
            )
        self._replace()

    def _replace(self) -> None:
        """Ask the cluster for one more worker (it joins once it has loaded)."""
        actor = self.actor_class.remote(self.spec)
        self.starting[actor] = actor.info.remote()

    def _admit_started(self, wait_s: float = 0.0, until: int = 0) -> None:
        """Move started workers that have loaded their engine into the pool, waiting up
        to `wait_s` until `until` workers are live. A worker whose engine failed to
        load raises that failure; one lost while starting is dropped."""
        import ray

        deadline = time.monotonic() + wait_s
        while self.starting:
            refs = {ref: actor for actor, ref in self.starting.items()}
            left = max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(refs), num_returns=1, timeout=min(left, 1.0))
            for ref in done:
                actor = refs[ref]
                del self.starting[actor]
                try:
                    info = ray.get(ref)
                except _lost_errors():
                    continue  # it died too; the next loss asks for another
                if info["failure"]:
                    ray.kill(actor, no_restart=True)
                    raise SelfImproveError(*info["failure"])
                self.workers[actor] = info
            if len(self.workers) >= until or time.monotonic() >= deadline:
                return

    # -- generation -----------------------------------------------------------------

    def shards(self, prompts: list[str], n: int, response_prefix: str, log) -> list[list[int]]:
        """Prompt indices of each shard: the engine's batches where it plans them."""
        plan = None
        for actor in list(self.workers):
            try:
                plan = self._get(actor.plan.remote(prompts, n, response_prefix))
                break
            except _lost_errors() as error:
                self._lose(actor, log, error)
        if plan is not None:
            return plan
        per_shard = max(1, -(-len(prompts) // (2 * max(1, len(self.workers)))))
        return [
            list(range(i, min(i + per_shard, len(prompts))))
            for i in range(0, len(prompts), per_shard)
        ]

    def generate(
        self,
        prompts: list[str],
        n: int,
        sampling: Sampling,
        log: LogFn | None = None,
        response_prefix: str = "",
    ) -> list[Completion]:
        import ray

        started = time.monotonic()
        lost_before = self.lost
        shards = self.shards(prompts, n, response_prefix, log) if prompts else []
        queue = deque(range(len(shards)))
        tries = [0] * len(shards)
        results: dict[int, list[Completion]] = {}
        in_flight: dict = {}  # ref -> (shard, actor)
        retried = 0
        waiting_since: float | None = None
        if log:
            log(
                f"ray: {len(prompts)} prompts x {n} samples in {len(shards)} shards over "
                f"{len(self.workers)} workers at {self.address}"
            )
        with Progress("generate", len(prompts) * n, log=log) as progress:
            while queue or in_flight:
                self._admit_started()
                for actor in list(self.workers):
                    busy = sum(1 for _, a in in_flight.values() if a == actor)
                    while queue and busy < IN_FLIGHT_PER_WORKER:
                        shard = queue.popleft()
                        texts = [prompts[i] for i in shards[shard]]
                        ref = actor.generate.remote(texts, n, sampling, response_prefix)
                        in_flight[ref] = (shard, actor)
                        busy += 1
                if not in_flight:  # every worker lost: wait for a replacement to load
                    if not self.starting:
                        self._replace()
                    waiting_since = waiting_since or time.monotonic()
                    if time.monotonic() - waiting_since > self.settings.start_timeout_s:
                        raise SelfImproveError(
                            f"Every Ray worker at {self.address} was lost and none could "
                            f"be restarted within {self.settings.start_timeout_s:.0f} s "
                            f"({len(queue)} of {len(shards)} shards left; the cluster has "
                            f"{_resources_line()})",
                            "check the cluster (`ray status`), then run the step again: "
                            "nothing of it was published",
                        )
                    self._admit_started(wait_s=1.0, until=1)
                    continue
                waiting_since = None
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in done:
                    shard, actor = in_flight.pop(ref)
                    try:
                        out = self._get(ref)
                    except _lost_errors() as error:
                        self._lose(actor, log, error)
                        tries[shard] += 1
                        if tries[shard] > self.settings.max_retries:
                            raise SelfImproveError(
                                f"Shard {shard} ({len(shards[shard])} prompts) lost its Ray "
                                f"worker {tries[shard]} times at {self.address}",
                                "check the cluster's nodes (`ray status`, OOM kills) or raise "
                                "SELFIMPROVE_RAY_MAX_RETRIES",
                            ) from None
                        queue.appendleft(shard)
                        retried += 1
                        continue
                    if shard not in results:  # kept once, whoever answers first
                        indices = shards[shard]
                        results[shard] = [
                            replace(c, prompt_index=indices[c.prompt_index]) for c in out
                        ]
                        progress.update(len(out))
        completions = sorted(
            (c for shard in results.values() for c in shard),
            key=lambda c: (c.prompt_index, c.sample_index),
        )
        expected = [(i, s) for i in range(len(prompts)) for s in range(n)]
        if [(c.prompt_index, c.sample_index) for c in completions] != expected:
            raise RuntimeError("Ray pool: lost or duplicated completions")  # a bug, not a fault
        seconds = time.monotonic() - started
        new_tokens = sum(c.completion_tokens for c in completions)
        self.last_stats = {
            "rows": len(completions),
            "new_tokens": new_tokens,
            "seconds": seconds,
            "tokens_per_s": new_tokens / max(seconds, 1e-9),
            "shards": len(shards),
            "workers": len(self.workers),
            "retries": retried,
            "workers_lost": self.lost - lost_before,
        }
        if log:
            log(
                f"ray: generated {len(completions)} completions in {seconds:.1f} s on "
                f"{len(self.workers)} workers ({retried} shards retried after "
                f"{self.lost - lost_before} workers were lost)"
            )
        return completions

    def close(self) -> None:
        """Stop the workers (frees their memory and GPUs; the cluster stays up)."""
        try:
            import ray
        except ImportError:
            return
        actors = [*self.workers, *self.starting]
        self.workers, self.starting = {}, {}
        if not ray.is_initialized():
            return  # the connection (and with it every actor) is gone already
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                continue


def _resources_line() -> str:
    """The cluster's total and free CPUs / GPUs, for error messages."""
    import ray

    try:
        total, free = ray.cluster_resources(), ray.available_resources()
    except Exception:
        return "resources unknown"
    parts = []
    for name in ("CPU", "GPU"):
        if total.get(name):
            parts.append(f"{free.get(name, 0):g} of {total[name]:g} {name}s free")
    return ", ".join(parts) or "no CPUs or GPUs"
