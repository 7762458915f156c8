"""The transformers engine and LoRA training on a tiny random model (seconds, CPU)."""

from __future__ import annotations

import json

import pytest

from selfimprove_dagster.engines import make_engine
from selfimprove_dagster.engines.base import Sampling
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.models import load_model
from selfimprove_dagster.training import TrainParams, micro_batch_size, train_lora_sft

PROMPTS = ["What is 12 + 30? Answer with just the number.", "Hi", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def engine(tiny_model, models_dir):
    return make_engine("transformers", tiny_model, models_dir, batch_size=4)


def test_generate_returns_n_per_prompt_in_prompt_major_order(engine):
    out = engine.generate(PROMPTS, 3, Sampling(temperature=1.0, max_new_tokens=5, seed=1))
    assert [(c.prompt_index, c.sample_index) for c in out] == [
        (i, s) for i in range(3) for s in range(3)
    ]
    assert all(0 < c.completion_tokens <= 5 for c in out)
    assert all(c.finish_reason in {"stop", "length"} for c in out)
    assert out[0].prompt_tokens > out[3].prompt_tokens  # "Hi" is the shortest prompt
    assert engine.last_stats["rows"] == 9


def test_sampling_is_reproducible_for_a_seed(engine):
    sampling = Sampling(temperature=1.0, max_new_tokens=6, seed=7)
    first = [c.text for c in engine.generate(PROMPTS, 2, sampling)]
    again = [c.text for c in engine.generate(PROMPTS, 2, sampling)]
    assert first == again


def test_greedy_batched_matches_one_by_one(engine):
    """Left padding must not change what a prompt generates."""
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    batched = [c.text for c in engine.generate(PROMPTS, 1, greedy)]
    alone = [engine.generate([p], 1, greedy)[0].text for p in PROMPTS]
    assert batched == alone


def test_unknown_engine():
    with pytest.raises(SelfImproveError, match="Unknown generation engine `tgi`"):
        make_engine("tgi", "x", None)


def test_lora_training_writes_a_loadable_checkpoint_with_manifest(tiny_model, models_dir, tmp_path):
    examples = [{"prompt": f"What is {i} + 1?", "completion": str(i + 1)} for i in range(6)]
    out_dir = tmp_path / "checkpoints" / "round_000"
    params = TrainParams(epochs=2, batch_size=4, lora_r=4, lora_alpha=8)
    manifest = train_lora_sft(
        tiny_model, examples, params, out_dir, models_dir, manifest_extra={"round": "round_000"}
    )
    assert manifest["optimizer_steps"] == manifest["planned_steps"] == 4  # ceil(6/4) * 2
    assert manifest["final_loss"] > 0
    assert manifest["trained_from"] == tiny_model
    assert manifest["round"] == "round_000"
    assert set(manifest["library_versions"]) >= {"torch", "transformers", "trl", "peft"}
    # The version is the name of the folder the checkpoint link points to, assigned when
    # it is published; the manifest inside it holds everything else.
    written = json.loads((out_dir / "manifest.json").read_text())
    assert written == {k: v for k, v in manifest.items() if k != "version"}
    assert out_dir.resolve().name == f"round_000@{manifest['version']}"
    assert [p.name for p in out_dir.parent.iterdir() if p.name.startswith(".tmp")] == []
    model = load_model(str(out_dir), models_dir)  # base + adapter, merged
    assert not hasattr(model, "peft_config")
    engine = make_engine("transformers", str(out_dir), models_dir)
    assert (
        len(engine.generate(["What is 1 + 1?"], 1, Sampling(temperature=0.0, max_new_tokens=3)))
        == 1
    )


def test_training_on_nothing_is_refused(tiny_model, models_dir, tmp_path):
    with pytest.raises(SelfImproveError, match="empty filtered set"):
        train_lora_sft(tiny_model, [], TrainParams(), tmp_path / "c", models_dir)


def test_prefix_sharing_matches_generating_each_row_from_scratch(engine):
    """k greedy samples share one prompt prefill; each must equal a plain generate()."""
    import torch

    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    shared = engine.generate(PROMPTS, 3, greedy)
    tokenizer, model = engine.tokenizer, engine.model
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(engine.chat_text(prompt), add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        plain = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert {c.text for c in shared[3 * i : 3 * i + 3]} == {plain.strip()}


@pytest.mark.parametrize(
    ("batch", "longest", "micro"),
    [(16, 60, 16), (16, 350, 4), (16, 5000, 1), (12, 300, 6), (16, 0, 16)],
)
def test_micro_batches_divide_the_batch_and_fit_the_token_budget(batch, longest, micro):
    # 2-digit addition (~60 tokens) trains as before; a rationale batch is split.
    assert micro_batch_size(batch, longest, token_budget=2048) == micro


def test_long_sequences_train_in_accumulated_micro_batches(tiny_model, models_dir, tmp_path):
    # A token budget below two sequences: one sequence per forward pass, accumulated into
    # the same optimizer steps a full batch would take.
    examples = [{"prompt": f"What is {i} + 1?", "completion": str(i + 1) * 20} for i in range(6)]
    params = TrainParams(epochs=1, batch_size=4, lora_r=4, lora_alpha=8, micro_batch_tokens=64)
    manifest = train_lora_sft(tiny_model, examples, params, tmp_path / "c", models_dir)
    assert manifest["micro_batch"] == 1
    assert manifest["optimizer_steps"] == manifest["planned_steps"] == 2  # ceil(6/4)
