"""Dagster layer: one self-improvement loop's assets, checks, jobs, sensors and the
reading of Dagster's record, built per loop by `build_loop(spec)` (assets/rounds.py);
the `experiments` asset compares loops (assets/experiments.py). Thin over the core."""

from selfimprove_dagster.assets.loop import Loop, LoopSpec
from selfimprove_dagster.assets.rounds import build_loop, loops_of

__all__ = ["Loop", "LoopSpec", "build_loop", "loops_of"]
