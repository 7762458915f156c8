"""Publishing a trained adapter as a round's checkpoint: one atomic swap.

The adapter, the tokenizer and a manifest (what was trained on what, with which
settings, and the content hashes that identify the adapter and its parent) are written
to a unique temporary folder and published with one atomic swap, so a failed or killed
run leaves the previous checkpoint, never half of a new one.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

from selfimprove_dagster.errors import disk_full_error, is_disk_full
from selfimprove_dagster.models import CHECKPOINT_MANIFEST, adapter_sha256
from selfimprove_dagster.store.versions import publish_dir


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "selfimprove-dagster"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def portable_ref(ref: str, out_dir: Path) -> str:
    """Store a sibling checkpoint as `../round_N`, so the data dir can be moved."""
    path = Path(ref)
    if path.is_absolute() and path.parent == out_dir.resolve().parent:
        return f"../{path.name}"
    return ref


def save_adapter(trainer, tokenizer, tmp_dir: Path) -> None:
    """Write the trained adapter and its tokenizer into `tmp_dir`. On any failure the
    folder is removed (nothing half-written stays behind); a full disk is one line."""
    try:
        trainer.model.save_pretrained(str(tmp_dir))
        tokenizer.save_pretrained(str(tmp_dir))
    except BaseException as error:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if is_disk_full(error):
            raise disk_full_error("the checkpoint", tmp_dir.parent) from error
        raise


def publish_checkpoint(
    tmp_dir: Path, out_dir: Path, manifest: dict[str, Any], run_id: str | None = None
) -> dict[str, Any]:
    """Publish a trained adapter folder `tmp_dir` (from `staging_dir(out_dir)`) as the
    current checkpoint at `out_dir`: records the adapter's content hash in the manifest,
    writes it, and swaps `out_dir` to the new folder in one atomic step. Every trainer
    (SFT, DPO, GRPO) ends here. Returns the manifest as written."""
    shutil.rmtree(tmp_dir / "trainer", ignore_errors=True)
    manifest = {**manifest, "adapter_sha256": adapter_sha256(tmp_dir)}
    try:
        (tmp_dir / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        version = publish_dir(tmp_dir, out_dir, run_id)
    except BaseException as error:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if is_disk_full(error):
            raise disk_full_error("the checkpoint", out_dir.parent) from error
        raise
    return {**manifest, "version": version.name.partition("@")[2]}
