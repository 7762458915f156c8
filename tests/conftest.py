"""Fixtures: the embedded model converted once per session, a tiny random model with
the same tokenizer, a scripted (fake) engine for asset plumbing tests, problem tables."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from selfimprove_dagster.engines.base import Completion, GenerationEngine, Sampling
from selfimprove_dagster.resources import StorageResource
from selfimprove_dagster.sources.tasks import make_task
from selfimprove_dagster.store.storage import RoundStore

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """Converted models shared by the session (the embedded conversion runs once)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def embedded_folder(models_dir) -> Path:
    from selfimprove_dagster.models import embedded_model_folder

    return embedded_model_folder("smollm2-135m-instruct", models_dir)


def build_tiny_llama(tokenizer_folder: Path, folder: Path, head_dim: int = 8) -> str:
    """A 2-layer random Llama (seed 0) with the real tokenizer and chat template, saved
    in `folder`: 4 heads of `head_dim` (2 key/value heads), MLP twice the hidden size."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    heads = 4
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(embedded_folder, tmp_path_factory) -> str:
    """A 2-layer random Llama with the real tokenizer and chat template (~3 M params)."""
    return build_tiny_llama(embedded_folder, tmp_path_factory.mktemp("tiny-llama"))


class ScriptedEngine(GenerationEngine):
    """Test-only engine: answers "What is A + B?" right for sample 0 of every other
    prompt and wrong otherwise, so filtering and training see a known mix."""

    def __init__(self, model_ref: str) -> None:
        self.model_ref = model_ref
        self.last_stats = {"rows": 0, "new_tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0}

    def generate(
        self, prompts: list[str], n: int, sampling: Sampling, log=None
    ) -> list[Completion]:
        out = []
        for i, prompt in enumerate(prompts):
            a, b = map(int, re.findall(r"\d+", prompt)[:2])
            for s in range(n):
                right = s == 0 and i % 2 == 0
                text = f"{a} + {b} = {a + b if right else a + b + 1}"
                out.append(Completion(i, s, text, 10, 8, "stop"))
        return out


@pytest.fixture
def problems() -> pl.DataFrame:
    return make_task("addition_2digit", n_train=8, n_eval=6, seed=0)


@dataclass(frozen=True)
class StubStore(RoundStore):
    """The round store with its checkpoint-chain verdicts set by the test (the real
    `chain_problem` hashes adapters; sensor and CLI tests have none)."""

    broken: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def chain_problem(self, round_: str) -> str | None:
        return self.broken.get(round_)


# Stub stores by data dir: a resource is rebuilt from its config, so it finds its stub here.
STORES: dict[str, StubStore] = {}


class StubStorageResource(StorageResource):
    def store(self) -> RoundStore:
        return STORES[self.data_dir]


@pytest.fixture
def cli_store(tmp_path, monkeypatch) -> StubStore:
    """A stub store with its own Dagster instance (the CLI's dagster.yaml) for tests of
    `selfimprove run` over stand-in round jobs. The status table reads a real round's
    tables, which stand-in rounds do not have: it is empty here."""
    from selfimprove_dagster import cli

    stub = StubStore(tmp_path / "var")
    STORES[str(stub.data_dir)] = stub
    home = stub.data_dir / "dagster_home"
    home.mkdir(parents=True)
    cli.write_instance_config(home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setattr(cli, "status_rows", lambda handle, record=None: [])
    return stub


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster on this machine: a head and one worker node, 1 CPU each, on
    loopback without token auth, this process connected to it (tests/test_ray_pool.py).
    Started once (~10 s); its /tmp/ray session folders are removed afterwards."""
    import glob
    import os
    import shutil

    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 turns token auth on for new clusters
    # Keep 127.0.0.1: otherwise Ray swaps a loopback address for the node's own IP.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    saved_flag, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    before = set(glob.glob("/tmp/ray/session_*"))
    had_current = Path("/tmp/ray/ray_current_cluster").exists()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for session in set(glob.glob("/tmp/ray/session_*")) - before:
            shutil.rmtree(session, ignore_errors=True)
        latest = Path("/tmp/ray/session_latest")
        if latest.is_symlink() and not latest.exists():
            latest.unlink()
        if not had_current:  # the address file of the cluster that is gone now
            Path("/tmp/ray/ray_current_cluster").unlink(missing_ok=True)


# --- one loop's definitions for tests ------------------------------------------------

TEST_LOOP = "t"  # the loop name tests build their rounds under


def loop_definitions(resources: dict, name: str = TEST_LOOP, extra_assets=(), checks=True):
    """A loop's Dagster definitions (`assets.build_loop`) from test resources by group;
    groups left out get their defaults. Returns (definitions, loop)."""
    import dagster as dg

    from selfimprove_dagster.assets import Loop, LoopSpec, build_loop
    from selfimprove_dagster.resources.settings import GROUPS

    spec = LoopSpec(name, {group: resources.get(group) or cls() for group, cls in GROUPS.items()})
    defs = build_loop(spec)
    if extra_assets:
        defs = dg.Definitions.merge(defs, dg.Definitions(assets=list(extra_assets)))
    return defs, Loop.of(spec)


def materialize_round(resources: dict, key: str, instance, name: str = TEST_LOOP, **run):
    """Run one round of a test loop through its round job (checks included)."""
    defs, loop = loop_definitions(resources, name)
    if not instance.has_dynamic_partition(loop.partitions.name, key):
        instance.add_dynamic_partitions(loop.partitions.name, [key])
    job = defs.resolve_job_def(loop.job_name)
    return job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False, **run)


def node(table: str, name: str = TEST_LOOP) -> str:
    """The op (node) name of a loop's step: `<loop>_<step>`."""
    return f"{name}_{table}"


def materialize_steps(resources: dict, key: str, instance, steps, name: str = TEST_LOOP):
    """Materialize some steps of a test loop's round (e.g. ("prompts",)) with their
    checks, through `dg.materialize`."""
    import dagster as dg

    defs, loop = loop_definitions(resources, name)
    if not instance.has_dynamic_partition(loop.partitions.name, key):
        instance.add_dynamic_partitions(loop.partitions.name, [key])
    wanted = {node(step, name) for step in steps}
    assets = [a for a in defs.assets if getattr(a, "node_def", None) and a.node_def.name in wanted]
    keys = {spec.key for a in assets for spec in a.specs}
    checks = [c for c in defs.asset_checks if {k.asset_key for k in c.check_keys} <= keys]
    return dg.materialize(
        [*assets, *checks],
        partition_key=key,
        instance=instance,
        resources=loop.resources(),
        raise_on_error=False,
    )


def stand_in_loop(store: RoundStore, name: str = TEST_LOOP, **groups):
    """A loop over the stub `store` (other groups: defaults, or `groups`), for tests of
    sensors, policy assets and the CLI over stand-in steps."""
    from selfimprove_dagster.assets import Loop, LoopSpec
    from selfimprove_dagster.resources.settings import GROUPS

    resources = {group: groups.get(group) or cls() for group, cls in GROUPS.items()}
    resources["storage"] = StubStorageResource(data_dir=str(store.data_dir))
    return Loop.of(LoopSpec(name, resources))


def loop_handle(defs, store: RoundStore, name: str = TEST_LOOP):
    """The CLI's handle on a stand-in loop of `defs`."""
    from selfimprove_dagster.assets import Loop
    from selfimprove_dagster.cli import LoopHandle
    from selfimprove_dagster.resources.settings import GROUPS

    loop = Loop(name)
    resources = {g: defs.resources[loop.resource_key(g)] for g in GROUPS}
    return LoopHandle(defs, loop, resources, store)
