"""History plot across rounds: a PNG file and its embeddable Markdown."""

from __future__ import annotations

import base64

import polars as pl

from selfimprove_dagster.plots import markdown_image, render_history

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "round": ["round_001", "round_000", "round_002"],  # out of order on purpose
            "accuracy_before": [0.65, 0.095, 0.815],
            "accuracy_after": [0.815, 0.65, 0.83],
            "pass_at_k": [0.9, None, 0.95],  # round_000 had no pass@k
            "kept_fraction": [0.5, 0.1, 0.7],
            "balance_score": [None, None, None],  # not monitored yet: panel left empty
        }
    )


def test_render_history_writes_a_png(tmp_path):
    path = render_history(_history(), tmp_path / "plots" / "history.png")
    assert path == tmp_path / "plots" / "history.png"
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert list(path.parent.iterdir()) == [path]  # no partial file left behind


def test_render_history_tolerates_missing_columns_and_one_round(tmp_path):
    # Only the first round's accuracies exist; the other panels have no column at all.
    history = pl.DataFrame({"accuracy_before": [0.1], "accuracy_after": [0.6]})
    path = render_history(history, tmp_path / "history.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_markdown_image_embeds_the_png(tmp_path):
    path = render_history(_history(), tmp_path / "history.png")
    markdown = markdown_image(path)
    assert markdown.startswith("![")
    prefix = "](data:image/png;base64,"
    assert prefix in markdown
    encoded = markdown.split(prefix, 1)[1].removesuffix(")")
    assert base64.b64decode(encoded) == path.read_bytes()
