"""Stable row ids and content hashes (the join keys of the lineage catalog).

- `prompt_id`: hash of the prompt text, identical in every round that uses it.
- `generation_id`: hash of (round, prompt_id, sample index), unique per sample.
- refined answers (Self-Refine) get an id derived from the sample they rewrite.
- `content_hash`: hash of a table's rows, recorded in the checkpoint manifest so a
  checkpoint names exactly the filtered set it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable


def _digest(text: str, length: int = 16) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def prompt_id(prompt: str) -> str:
    """Stable id of a prompt: the same text gets the same id in every round."""
    return _digest("prompt\x00" + prompt)


def generation_id(round_key: str, prompt_id_: str, sample_index: int) -> str:
    """Id of one sampled completion: (round, prompt, sample index) is unique."""
    return _digest(f"generation\x00{round_key}\x00{prompt_id_}\x00{sample_index}")


def refined_generation_id(parent_generation_id: str) -> str:
    """Id of a refined answer: derived from the sample it rewrites (one refinement each)."""
    return _digest(f"refined\x00{parent_generation_id}")


def content_hash(rows: Iterable[dict]) -> str:
    """Order-independent sha256 of a table's rows (each row a JSON-able dict)."""
    row_hashes = sorted(_digest(json.dumps(r, sort_keys=True, default=str), 64) for r in rows)
    return hashlib.sha256("\n".join(row_hashes).encode()).hexdigest()


def file_sha256(path: str, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a file's bytes (used to key the converted embedded model)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
