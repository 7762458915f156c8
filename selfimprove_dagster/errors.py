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

    def __reduce__(self):
        # Rebuilt from (problem, fix), so it crosses process boundaries (Ray workers,
        # multiprocessing) as itself.
        return (type(self), (self.problem, self.fix))


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is "No space left on device": OSError 28, or a
    library's wrapper that only says so in words (safetensors' SafetensorError)."""
    import errno

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full_error(what: str, path, needed_bytes: int | None = None) -> SelfImproveError:
    """The one line a full disk gets: what was being written, where, the space it needed
    when known, and the fix."""
    import shutil

    needed = f" (needed about {needed_bytes / 2**20:.0f} MiB)" if needed_bytes else ""
    try:
        free = f"; {shutil.disk_usage(path).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    return SelfImproveError(
        f"No space left on device while writing {what} to {path}{needed}{free}",
        "free space on that disk (`selfimprove gc` removes old versions) or move the data "
        "dir (--data-dir / SELFIMPROVE_DATA_DIR), then run `selfimprove run` again: it "
        "resumes at the step that stopped",
    )
