"""Where rounds, checkpoints, converted models and the DuckDB catalog live."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from selfimprove_dagster.store.storage import RoundStore


class StorageResource(dg.ConfigurableResource):
    """Where rounds, checkpoints, converted models and the DuckDB catalog live."""

    data_dir: str = Field(default="var", description="Data dir (relative to the working dir).")

    def store(self) -> RoundStore:
        return RoundStore.at(self.data_dir)
