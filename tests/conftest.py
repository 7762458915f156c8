"""Fixtures: the embedded model converted once per session, a tiny random model with
the same tokenizer, a scripted (fake) engine for asset plumbing tests, problem tables."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from resources import StorageResource
from selfimprove_dagster.engines.base import Completion, GenerationEngine, Sampling
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
    monkeypatch.setattr(cli, "status_rows", lambda store, record=None: [])
    return stub
