"""Checkpoint identity: a manifest names its adapter, its parent (checkpoint adapter hash,
or the base model's absolute path and hash) and the data it trained on; loading
verifies the chain and refuses a checkpoint whose parent changed. Real LoRA training
on the tiny random model (seconds)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.models import checkpoint_problem, load_model, read_manifest
from selfimprove_dagster.store.storage import RoundStore
from selfimprove_dagster.training import TrainParams, train_lora_sft

EXAMPLES = [{"prompt": f"What is {a} + 1?", "completion": str(a + 1)} for a in range(4)]


def _train(store: RoundStore, round_: str, trained_from: str, seed: int = 0) -> dict:
    return train_lora_sft(
        trained_from,
        EXAMPLES,
        TrainParams(epochs=1, batch_size=4, seed=seed, lora_r=2, lora_alpha=4),
        store.checkpoint_dir(round_),
        store.models_dir,
        manifest_extra={"round": round_},
    )


@pytest.fixture(scope="module")
def trained(tiny_model, models_dir, tmp_path_factory):
    """round_000 trained from a *relative* base model (`./my-model`), round_001 on top
    (trained once per module; each test gets a copy of the data dir)."""
    root = tmp_path_factory.mktemp("identity")
    data_dir = root / "var"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(models_dir)
    shutil.copytree(tiny_model, root / "my-model")
    store = RoundStore(data_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        _train(store, "round_000", "./my-model")
        _train(store, "round_001", store.checkpoint_ref("round_000"))
    return store


@pytest.fixture
def chain(trained, tmp_path, monkeypatch):
    data_dir = tmp_path / "var"
    shutil.copytree(trained.data_dir, data_dir, symlinks=True)
    monkeypatch.chdir(tmp_path)  # loads run from another working dir than training did
    return RoundStore(data_dir)


def test_relative_base_model_is_recorded_absolute(chain):
    manifest = read_manifest(chain.checkpoint_dir("round_000"))
    base = manifest["trained_from"]  # not "./my-model": it would resolve elsewhere later
    assert Path(base).is_absolute() and Path(base).name == "my-model"
    assert manifest["parent"]["kind"] == "model" and manifest["parent"]["ref"] == base
    assert len(manifest["parent"]["sha256"]) == 64
    assert chain.chain_problem("round_000") is None
    load_model(chain.checkpoint_ref("round_000"), chain.models_dir)  # loads from another cwd


def test_manifest_names_its_adapter_and_parent_by_content(chain):
    parent = read_manifest(chain.checkpoint_dir("round_000"))
    manifest = read_manifest(chain.checkpoint_dir("round_001"))
    assert manifest["trained_from"] == "../round_000"
    assert manifest["parent"]["kind"] == "checkpoint"
    assert manifest["parent"]["adapter_sha256"] == parent["adapter_sha256"]
    assert manifest["adapter_sha256"] != parent["adapter_sha256"]
    assert chain.chain_problem("round_001") is None


def test_another_runs_checkpoint_as_base_model_is_not_mistaken_for_our_round(chain, tmp_path):
    """Round 0 of a new data dir sampled with and trained on another run's round_000:
    its policy is that checkpoint, not the new dir's own round_000."""
    from selfimprove_dagster.models import model_ref_identity

    other = RoundStore(tmp_path / "other")
    (other.data_dir).mkdir()
    (other.data_dir / "models").symlink_to(chain.models_dir.resolve())
    base = chain.checkpoint_ref("round_000")
    train_lora_sft(
        base,
        EXAMPLES,
        TrainParams(epochs=1, batch_size=4, seed=0, lora_r=2, lora_alpha=4),
        other.checkpoint_dir("round_000"),
        other.models_dir,
        manifest_extra={
            "round": "round_000",
            "policy_identity": model_ref_identity(base, other.models_dir),
        },
    )
    assert other.chain_problem("round_000") is None


def test_retraining_a_parent_makes_its_children_refuse_to_load(chain):
    _train(
        chain, "round_000", read_manifest(chain.checkpoint_dir("round_000"))["trained_from"], seed=1
    )
    assert chain.chain_problem("round_000") is None  # the new round_000 itself is fine
    problem = chain.chain_problem("round_001")
    assert problem is not None and "round_000" in problem and "re-materialized" in problem
    assert "\n" not in problem
    with pytest.raises(SelfImproveError) as error:
        load_model(chain.checkpoint_ref("round_001"), chain.models_dir)
    message = str(error.value)
    assert "is stale" in message and "Fix: materialize round_001 again" in message
    assert "\n" not in message


def test_a_changed_base_model_is_refused(chain):
    base = Path(read_manifest(chain.checkpoint_dir("round_000"))["trained_from"])
    weights = next(base.glob("*.safetensors"))
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-8] + b"\0" * 8)
        problem = chain.chain_problem("round_001")  # the chain reaches the base model
    finally:
        weights.write_bytes(original)
    assert problem is not None and "weights changed" in problem


def test_a_tampered_adapter_is_refused(chain):
    folder = chain.checkpoint_version_dir("round_001")
    adapter = next(folder.glob("adapter_model.*"))
    adapter.write_bytes(adapter.read_bytes() + b"\0")
    assert "adapter changed" in chain.chain_problem("round_001")


def test_a_missing_checkpoint_is_a_reason(tmp_path):
    assert RoundStore(tmp_path).chain_problem("round_002") == "round_002 has no checkpoint"


def test_checkpoints_from_before_identities_are_not_verified(tmp_path):
    folder = Path(tmp_path) / "round_000"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "manifest.json").write_text(json.dumps({"trained_from": "embedded:x"}))
    assert checkpoint_problem(folder, tmp_path) is None


def test_a_failed_training_leaves_the_previous_checkpoint_and_no_temp_folder(chain):
    before = os.readlink(chain.checkpoint_dir("round_001"))
    with pytest.raises(SelfImproveError, match="empty filtered set"):
        train_lora_sft("x", [], TrainParams(), chain.checkpoint_dir("round_001"), chain.models_dir)
    assert os.readlink(chain.checkpoint_dir("round_001")) == before
    assert not [p for p in chain.checkpoints_dir.iterdir() if p.name.startswith(".tmp-")]


# --- identity is content ------------------------------------------------------------------


def _adapter(folder: Path, config: dict, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_identity_ignores_where_the_base_model_was_and_the_module_order(tmp_path):
    from selfimprove_dagster.models import adapter_sha256

    config = {"r": 16, "lora_alpha": 32, "peft_type": "LORA", "task_type": "CAUSAL_LM"}
    one = _adapter(
        tmp_path / "one",
        config
        | {"base_model_name_or_path": "/data/a/var/models/x", "target_modules": ["q", "k", "v"]},
        b"same weights",
    )
    two = _adapter(
        tmp_path / "two",
        {"target_modules": ["v", "q", "k"], "base_model_name_or_path": "/elsewhere/models/x"}
        | config,
        b"same weights",
    )
    assert adapter_sha256(one) == adapter_sha256(two)
    other_weights = _adapter(tmp_path / "w", config | {"target_modules": ["q"]}, b"other")
    other_setting = _adapter(
        tmp_path / "s", config | {"r": 8, "target_modules": ["q", "k", "v"]}, b"same weights"
    )
    identities = {adapter_sha256(p) for p in (one, other_weights, other_setting)}
    assert len(identities) == 3  # weights and settings are the identity


def test_training_twice_gives_one_identity(trained, tiny_model, tmp_path, monkeypatch):
    """Identical training in another data dir, from a copy of the base model at another
    absolute path: the same adapter identity (the issue saw 8 different ones)."""
    store = RoundStore(tmp_path / "elsewhere" / "var")
    store.data_dir.mkdir(parents=True)
    (store.data_dir / "models").symlink_to(trained.models_dir.resolve())
    shutil.copytree(tiny_model, tmp_path / "elsewhere" / "my-model")
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = _train(store, "round_000", "./my-model")
    first = read_manifest(trained.checkpoint_dir("round_000"))
    assert again["trained_from"] != first["trained_from"]  # another absolute base path
    assert again["adapter_sha256"] == first["adapter_sha256"]
    assert store.chain_problem("round_000") is None
    # The hash of the config's bytes (the identity before) told them apart.
    from selfimprove_dagster.models import legacy_adapter_sha256

    assert legacy_adapter_sha256(store.checkpoint_dir("round_000")) != legacy_adapter_sha256(
        trained.checkpoint_dir("round_000")
    )


def test_checkpoints_recorded_with_the_old_identity_still_verify(chain):
    from selfimprove_dagster.models import legacy_adapter_sha256

    folder = chain.checkpoint_version_dir("round_000")
    manifest = read_manifest(folder)
    manifest["adapter_sha256"] = legacy_adapter_sha256(folder)  # as written before
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint_problem(folder, chain.models_dir) is None
    (folder / "adapter_model.safetensors").write_bytes(b"tampered")
    assert "adapter changed" in checkpoint_problem(folder, chain.models_dir)


def test_a_manifest_names_sibling_checkpoints_relatively(chain):
    manifest = read_manifest(chain.checkpoint_dir("round_001"))
    assert manifest["parent"]["ref"] == "../round_000"  # no absolute path of the data dir
