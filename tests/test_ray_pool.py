"""The Ray engine pool on a real local cluster (a head and one worker node, 1 CPU each,
started once per session by the `ray_cluster` fixture): the same rows as one process,
a worker node lost mid-step, an unreachable cluster, a missing extra, and a small round
through Dagster with `pool=ray`."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import fields, replace

import dagster as dg
import pytest

from selfimprove_dagster.engines.base import Sampling
from selfimprove_dagster.engines.pool import POOL
from selfimprove_dagster.errors import SelfImproveError
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
from tests.conftest import materialize_round, materialize_steps, node

# Prompts of four token lengths, so batches need padding (the case where batch
# composition could change the floating point).
PROMPTS = [f"What is {10 + i} + {20 + 3 * i}?" + " Show your work." * (i % 4) for i in range(12)]
SAMPLED = Sampling(temperature=0.9, top_k=20, max_new_tokens=8, seed=7)
GREEDY = Sampling(temperature=0.0, max_new_tokens=6)


def rows(completions) -> list[tuple]:
    return [
        (c.prompt_index, c.sample_index, c.text, c.completion_tokens, c.finish_reason)
        for c in completions
    ]


def spec(tiny_model, models_dir, engine="transformers", **kw):
    from selfimprove_dagster.engines.ray_pool import EngineSpec

    return EngineSpec(engine, tiny_model, str(models_dir), **{"batch_size": 4, **kw})


@pytest.fixture(scope="module")
def one_process(tiny_model, models_dir):
    """The reference: the transformers engine in this process, one torch thread."""
    from selfimprove_dagster.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(tiny_model, models_dir, batch_size=4, torch_threads=1)
    return {
        "sampled": engine.generate(PROMPTS, 2, SAMPLED),
        "judged": engine.generate(PROMPTS[:5], 1, GREEDY, response_prefix="Score:"),
        "plan": engine.plan(PROMPTS, 2),
    }


def test_a_sample_depends_on_its_prompt_sample_index_and_seed_alone(tiny_model, models_dir):
    """Seeded per sample, not per call: other prompts around it, another order and
    another place in the call leave a prompt's k samples as they were. (One prompt per
    batch here, so the forward pass's numerics are the same in every call.)"""
    from selfimprove_dagster.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(tiny_model, models_dir, batch_size=2, torch_threads=1)

    def by_prompt(prompts, sampling=SAMPLED):
        out = engine.generate(prompts, 2, sampling)
        return {(prompts[c.prompt_index], c.sample_index): c.text for c in out}

    picked = [PROMPTS[i] for i in (7, 2, 11)]
    alone = by_prompt(picked)
    assert by_prompt(PROMPTS) | alone == by_prompt(PROMPTS)  # same texts in a bigger call
    assert by_prompt(picked[::-1]) == alone
    assert by_prompt(picked, replace(SAMPLED, seed=8)) != alone
    assert alone[(picked[0], 0)] != alone[(picked[0], 1)]  # k samples, k streams


def test_the_seeded_sampler_draws_from_the_shaped_distribution():
    """Gumbel-max over the tempered, top-k-filtered scores: frequencies match softmax."""
    import torch

    from selfimprove_dagster.engines.transformers_engine import SeededSampler

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    sampler = SeededSampler(list(range(20_000)), Sampling(temperature=1.0, top_k=3))
    picks = sampler(None, probs.log().repeat(20_000, 1)).argmax(-1)
    freq = torch.bincount(picks, minlength=4) / 20_000
    kept = probs[:3] / probs[:3].sum()  # top-k=3 drops the last token
    assert freq[3] == 0 and torch.allclose(freq[:3], kept, atol=0.015)


@pytest.fixture(scope="module")
def two_workers(ray_cluster, tiny_model, models_dir):
    from selfimprove_dagster.engines.ray_pool import RayEnginePool, RaySettings

    pool = RayEnginePool(spec(tiny_model, models_dir), RaySettings(workers=2))
    assert pool.wait_for_workers() == 2
    yield pool
    pool.close()


def test_one_ray_worker_gives_the_rows_of_one_process(
    ray_cluster, tiny_model, models_dir, one_process
):
    from selfimprove_dagster.engines.ray_pool import RayEnginePool, RaySettings

    one = RayEnginePool(spec(tiny_model, models_dir), RaySettings(workers=1))
    try:
        assert rows(one.generate(PROMPTS, 2, SAMPLED)) == rows(one_process["sampled"])
        assert one.last_stats["workers"] == 1 and one.last_stats["retries"] == 0
    finally:
        one.close()


class ScriptedRayGenerator(GeneratorResource):
    """The generator with the test-only `ArithmeticEngine` in place of the model, in
    each Ray worker (pool=ray) or in this process (pool=local): a round on it keeps
    samples and trains, so the whole round runs through the Ray pool."""

    def engine_spec(self, model_ref, models_dir):
        from tests.test_ray_scripted import ArithmeticSpec

        spec = super().engine_spec(model_ref, models_dir)
        return ArithmeticSpec(**{f.name: getattr(spec, f.name) for f in fields(spec)})

    def start_engine(self, model_ref, models_dir):
        if self.pool == "ray":
            return super().start_engine(model_ref, models_dir)
        from tests.test_ray_scripted import ArithmeticEngine

        return ArithmeticEngine(model_ref)


def test_a_round_through_dagster_on_the_ray_pool(ray_cluster, tiny_model, models_dir, tmp_path):
    """A full small round (prompts to eval_scores, with every check) sampling on two Ray
    workers gives the generations the in-process engine gives, and trains on them."""
    tables = {}
    for pool in ("ray", "local"):
        data_dir = tmp_path / pool
        data_dir.mkdir()
        (data_dir / "models").symlink_to(models_dir)
        generator = ScriptedRayGenerator(
            base_model=tiny_model,
            samples_per_prompt=2,
            batch_size=4,
            pool=pool,
            ray_address=ray_cluster.address,
            ray_workers=2,
            ray_start_timeout_s=60,
        )
        instance = dg.DagsterInstance.ephemeral()
        try:
            result = materialize_round(round_resources(data_dir, generator), "round_000", instance)
            if pool == "ray":  # the round's last engine (its checkpoint's) stays pooled
                assert POOL.engine.wait_for_workers() == 2
        finally:
            POOL.release()
        assert result.success
        store = RoundStore(data_dir)
        assert store.has_checkpoint("round_000") and store.has("round_000", "eval_scores")
        tables[pool] = store.read("round_000", "generations")
    assert tables["ray"].height == 16
    assert tables["ray"].drop("policy").equals(tables["local"].drop("policy"))


# The two-worker pool (module-scoped) holds both CPUs from here on: tests that start
# pools of their own come before.
def test_two_ray_worker_nodes_give_the_rows_of_one_process(one_process, two_workers):
    assert len({info["node_id"] for info in two_workers.workers.values()}) == 2  # SPREAD
    out = two_workers.generate(PROMPTS, 2, SAMPLED)
    assert rows(out) == rows(one_process["sampled"])
    # A shard is one of the batches one process runs (4 rows = 2 prompts x 2 samples).
    assert two_workers.last_stats["shards"] == len(one_process["plan"]) == 6
    judged = two_workers.generate(PROMPTS[:5], 1, GREEDY, response_prefix="Score:")
    assert rows(judged) == rows(one_process["judged"])
    assert two_workers.generate([], 2, SAMPLED) == []


def test_a_worker_node_lost_mid_step_costs_a_retry_not_rows(
    ray_cluster, tiny_model, models_dir, two_workers
):
    from selfimprove_dagster.engines.transformers_engine import TransformersEngine

    prompts = PROMPTS * 4  # 48 prompts, 24 shards: long enough to lose a node in
    sampling = Sampling(temperature=0.9, top_k=20, max_new_tokens=48, seed=3)
    reference = TransformersEngine(tiny_model, models_dir, batch_size=4, torch_threads=1)
    expected = reference.generate(prompts, 2, sampling)
    worker_node = next(iter(ray_cluster.worker_nodes))
    lines: list[str] = []

    def remove_node_once_started():
        while not lines:
            time.sleep(0.05)
        time.sleep(0.5)  # shards are running on both nodes by now
        ray_cluster.remove_node(worker_node)

    killer = threading.Thread(target=remove_node_once_started)
    killer.start()
    try:
        out = two_workers.generate(prompts, 2, sampling, log=lines.append)
    finally:
        killer.join()
        ray_cluster.add_node(num_cpus=1)  # the next tests get their two nodes back
        ray_cluster.wait_for_nodes()
    assert rows(out) == rows(expected)  # every prompt's k samples, once, as before
    assert two_workers.last_stats["retries"] >= 1
    assert two_workers.last_stats["workers_lost"] == 1
    assert any("lost (" in line for line in lines)


def test_a_step_process_connects_through_dagster_ray(ray_cluster, two_workers):
    """What a step does with `ray_address` set: a process of its own (one Ray connection
    per process) connects through dagster-ray's resource to this cluster, while the
    two-worker pool holds every CPU of it (dagster-ray's remote Ray Data setup task
    would wait for a CPU forever)."""
    import subprocess

    import ray

    assert ray.available_resources().get("CPU", 0) == 0  # the pool's workers hold them
    code = (
        "from selfimprove_dagster.resources.ray import connect; "
        f"print(connect({ray_cluster.address!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    from selfimprove_dagster.resources.ray import same_address

    assert same_address(out.stdout.strip().splitlines()[-1], ray_cluster.address)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_resources(data_dir, generator: GeneratorResource) -> dict:
    return {
        "storage": StorageResource(data_dir=str(data_dir)),
        "task": TaskResource(
            n_train=8,
            n_eval=6,
            eval_samples_per_prompt=2,
            pass_at_k_prompts=4,
        ),
        "generator": generator,
        "trainer": TrainerResource(epochs=1, batch_size=4, lora_r=4, lora_alpha=8),
        "gates": GatesResource(),
        "evolution": EvolutionResource(),
        "method": MethodResource(),
    }


def test_an_unreachable_cluster_fails_the_step_in_one_line_and_publishes_nothing(
    tiny_model, models_dir, tmp_path
):
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    generator = GeneratorResource(base_model=tiny_model, pool="ray", ray_address=address)
    (tmp_path / "models").symlink_to(models_dir)
    instance = dg.DagsterInstance.ephemeral()
    resources = round_resources(tmp_path, generator)
    result = materialize_steps(resources, "round_000", instance, ["prompts", "generations"])
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == node("generations")
    message = failure.step_failure_data.error.cause.message.strip()  # the SelfImproveError
    assert message.startswith(
        f"selfimprove_dagster.errors.SelfImproveError: Cannot reach the Ray cluster at {address}"
    )
    assert "Fix: start it" in message and "\n" not in message
    store = RoundStore(tmp_path)
    assert store.has("round_000", "prompts") and not store.has("round_000", "generations")


def test_without_the_extra_the_ray_pool_names_it(monkeypatch, tmp_path):
    for module in ("ray", "dagster_ray"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    generator = GeneratorResource(pool="ray", keep_engine=False)
    with pytest.raises(SelfImproveError, match=r"pip install -e '\.\[ray\]'"):
        generator.load("embedded:smollm2-135m-instruct", tmp_path)
    with pytest.raises(SelfImproveError, match="already the parallel part"):
        GeneratorResource(pool="ray", engine="openai").load("m", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(
    not os.environ.get("SELFIMPROVE_TEST_GPU"),
    reason="needs a GPU and vLLM (SELFIMPROVE_TEST_GPU=1)",
)
def test_vllm_engines_on_ray_gpu_workers(ray_cluster, tiny_model, models_dir):
    """The vLLM engine in a Ray actor holding one GPU: k samples per prompt, prompt-major,
    and greedy rows as one process gives them."""
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from selfimprove_dagster.engines.ray_pool import RayEnginePool, RaySettings
    from selfimprove_dagster.engines.vllm_engine import VllmEngine, VllmSettings

    node = ray_cluster.add_node(num_cpus=1, num_gpus=1)
    settings = VllmSettings(enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.3)
    gpu_spec = spec(tiny_model, models_dir, engine="vllm", vllm=settings)
    pool = RayEnginePool(gpu_spec, RaySettings(workers=1, gpus_per_worker=1))
    try:
        out = pool.generate(PROMPTS[:4], 3, SAMPLED)
        assert [(c.prompt_index, c.sample_index) for c in out] == [
            (i, s) for i in range(4) for s in range(3)
        ]
        greedy = pool.generate(PROMPTS[:4], 1, GREEDY)
    finally:
        pool.close()
        ray_cluster.remove_node(node)
    local = VllmEngine(tiny_model, models_dir, settings)
    try:
        assert rows(greedy) == rows(local.generate(PROMPTS[:4], 1, GREEDY))
    finally:
        local.close()
