"""Progress for long steps: a tqdm bar in the terminal and periodic log lines.

Inside Dagster the log callback is `context.log.info`, so the run log shows lines like
`generate: 384/800 (48%), 6.1 rows/s, ~68 s left` every `log_every_s` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

LogFn = Callable[[str], None]


class Progress:
    """Counts done/total for one step; use as a context manager."""

    def __init__(
        self,
        label: str,
        total: int,
        log: LogFn | None = None,
        unit: str = "rows",
        log_every_s: float = 15.0,
    ) -> None:
        from tqdm.auto import tqdm  # light import, but only needed when a step runs

        self.label, self.total, self.unit = label, total, unit
        self.log, self.log_every_s = log, log_every_s
        self.done = 0
        self.started = self.last_logged = time.monotonic()
        self.bar = tqdm(total=total, desc=label, unit=unit, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if self.log and (now - self.last_logged >= self.log_every_s or self.done >= self.total):
            self.last_logged = now
            self.log(self.status_line())

    def status_line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done}/{self.total} ({percent:.0f}%), "
            f"{rate:.1f} {self.unit}/s, ~{left:.0f} s left"
        )

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
