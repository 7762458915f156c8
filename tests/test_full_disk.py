"""A full disk while writing a checkpoint or converting the embedded model: one line
naming the path, the space (needed, free) and the fix; the temporary folder removed.
(The Parquet publish's own full-disk tests are in tests/test_versions.py.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from selfimprove_dagster.errors import SelfImproveError
from tests.test_versions import small_disk  # noqa: F401 (a 1 MiB tmpfs fixture)


class _BigWriter:
    """A stand-in model whose save writes more than the disk holds."""

    def save_pretrained(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"\0" * (2 * 2**20))


def test_a_checkpoint_that_does_not_fit_is_one_line_and_leaves_nothing(small_disk):  # noqa: F811
    from selfimprove_dagster.training.checkpoint import save_adapter

    tmp = small_disk / "checkpoints" / ".round_000.tmp"
    trainer = SimpleNamespace(model=_BigWriter())
    tokenizer = SimpleNamespace(save_pretrained=lambda folder: None)
    with pytest.raises(SelfImproveError) as error:
        save_adapter(trainer, tokenizer, tmp)
    message = str(error.value)
    assert message.startswith("No space left on device while writing the checkpoint to ")
    assert "MiB free there" in message and "Fix: free space" in message
    assert "\n" not in message
    assert not tmp.exists()


@pytest.mark.slow
def test_a_model_conversion_that_does_not_fit_is_one_line_and_leaves_nothing(small_disk):  # noqa: F811
    from selfimprove_dagster.models import convert_gguf, embedded_gguf_path

    folder = small_disk / "models" / "smollm2"
    with pytest.raises(SelfImproveError) as error:
        convert_gguf(embedded_gguf_path("smollm2-135m-instruct"), folder)
    message = str(error.value)
    assert message.startswith("No space left on device while writing the converted model")
    assert "needed about 513 MiB" in message or "needed about" in message
    assert not folder.exists() and not folder.with_name(folder.name + ".tmp").exists()
