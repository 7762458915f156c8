"""Plots across rounds for the Dagster UI: a PNG of the loop's history, and Markdown
that embeds it (Dagster renders Markdown metadata, and a data URI needs no file server).

    path = render_history(history, data_dir / "plots" / "history.png")
    metadata["history"] = dg.MetadataValue.md(markdown_image(path))

`history` has one row per round: `round` (round_000, ...) or `round_index`, and any of
the plotted columns below; a missing or all-null column is left out of its panel.
matplotlib is imported inside `render_history` (it is slow to import) and drawn with
the Agg canvas directly, so no GUI backend or pyplot global state is involved.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from selfimprove_dagster.store.storage import round_index

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# Panel title -> (column, line label) pairs; every value is a fraction in [0, 1].
PANELS: dict[str, list[tuple[str, str]]] = {
    "Held-out accuracy (greedy)": [
        ("accuracy_before", "policy (before)"),
        ("accuracy_after", "checkpoint (after)"),
    ],
    "pass@k": [("pass_at_k", "held-out pass@k")],
    "Kept fraction / RL reward": [
        ("kept_fraction", "filtered / generated"),
        ("rl_reward_mean", "RL reward (mean over steps)"),
    ],
    "Balance / RL signal": [
        ("balance_score", "B-STaR balance score"),
        ("rl_zero_std_fraction", "RL groups with no reward variance"),
    ],
}
FIGURE_SIZE = (10.0, 6.5)  # inches; with DPI, about 1000 x 650 pixels
DPI = 100


def render_history(history: pl.DataFrame, path: Path) -> Path:
    """Draw the history panels (2 x 2, value vs round index) into a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    history = _with_round_index(history).sort("round_index")
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (title, lines) in zip(figure.subplots(2, 2).flat, PANELS.items(), strict=True):
        drawn = [_line(axes, history, column, label) for column, label in lines]
        axes.set_title(title)
        axes.set_xlabel("round")
        axes.set_ylim(-0.02, 1.02)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if any(drawn):
            axes.legend(loc="best", fontsize="small")
        else:
            axes.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=axes.transAxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so the UI never links a half-written PNG.
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png")
    os.replace(partial, path)
    return path


def markdown_image(path: Path, alt: str = "history across rounds") -> str:
    """Markdown image with the PNG embedded as a base64 data URI."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![{alt}](data:image/png;base64,{encoded})"


def _with_round_index(history: pl.DataFrame) -> pl.DataFrame:
    if "round_index" in history.columns:
        return history
    if "round" in history.columns:
        indices = [round_index(key) for key in history["round"].to_list()]
        return history.with_columns(round_index=pl.Series(indices, dtype=pl.Int64))
    return history.with_row_index("round_index")  # rows already in round order


def _line(axes: Axes, history: pl.DataFrame, column: str, label: str) -> bool:
    """Plot `column` vs round index; False (nothing drawn) when missing or all null."""
    if column not in history.columns:
        return False
    points = history.select("round_index", column).drop_nulls()
    if points.height == 0:
        return False
    axes.plot(points["round_index"].to_list(), points[column].to_list(), marker="o", label=label)
    return True


def render_experiments(experiments: pl.DataFrame, path: Path) -> Path:
    """Held-out accuracy after each round, one line per loop (round 0's starting
    accuracy at x = -1, so every line starts from its base model)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8.0, 4.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    frame = _with_round_index(experiments)
    for (loop,), rows in frame.sort("round_index").group_by("loop", maintain_order=True):
        x = [-1, *rows["round_index"].to_list()]
        y = [rows["accuracy_before"][0], *rows["accuracy_after"].to_list()]
        axes.plot(x, y, marker="o", label=str(loop))
    axes.set_title("Held-out accuracy per round, per loop")
    axes.set_xlabel("round (-1: the base model)")
    axes.set_ylim(-0.02, 1.02)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if frame.height:
        axes.legend(loc="best", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png")
    os.replace(partial, path)
    return path
