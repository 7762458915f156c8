"""Errors the user can act on: each names the problem and the fix.

Raise `SelfImproveError(problem, fix)` wherever bad input or a missing prerequisite
is detected; the CLI and the Dagster run log show the one-line message as is.
"""

from __future__ import annotations


class SelfImproveError(RuntimeError):
    """A problem the user can fix; `str(err)` reads "<problem>. Fix: <fix>"."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix
        super().__init__(f"{self.problem}. Fix: {fix}")
