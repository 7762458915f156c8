"""How a round's tables become Dagster assets: their specs (columns, DuckDB view), one
atomic publish per step, and the materialization results with a content data version.
Every step module (`assets/generate.py` ... `assets/evaluate.py`) uses these."""

from collections.abc import Iterator

import dagster as dg
import polars as pl

from selfimprove_dagster.store import schemas
from selfimprove_dagster.store.storage import RoundStore
from selfimprove_dagster.store.versions import TableVersion

ROUND_KINDS = {"python", "parquet"}


def save(
    context: dg.AssetExecutionContext,
    store: RoundStore,
    step: str,
    frames: dict[str, pl.DataFrame | None],
) -> TableVersion:
    """Publish the step's tables as one new version of the round (a None frame: not
    written this time, so that table is no longer current) and refresh the catalog."""
    written = {table: frame for table, frame in frames.items() if frame is not None}
    version = store.publish(context.partition_key, step, written, run_id=context.run_id)
    context.log.info(
        f"{context.partition_key}: {step} version {version.version}: {', '.join(written)}"
    )
    context.log.info(store.refresh_catalog())
    return version


def table_schema(table: str) -> dg.TableSchema:
    """The declared columns of a round table (`store.schemas`, shared with the GE suites)."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(c.name, c.type, description=c.description or None)
            for c in schemas.columns(table)
        ]
    )


def table_metadata(table: str) -> dict:
    """A round table's definition metadata: its columns and its DuckDB view."""
    return {"dagster/column_schema": table_schema(table), "dagster/table_name": table}


def table_spec(table: str, group: str, deps=(), skippable: bool = False, **kwargs):
    """A round table as an asset of a multi-asset step: its columns and its DuckDB view."""
    return dg.AssetSpec(
        table,
        deps=list(deps),
        skippable=skippable,
        group_name=group,
        kinds=kwargs.pop("kinds", ROUND_KINDS),
        description=kwargs.pop("description", None),
        metadata=table_metadata(table),
        **kwargs,
    )


def table_result(
    version: TableVersion, table: str, metadata: dict | None = None
) -> dg.MaterializeResult:
    """A table's materialization: row count, DuckDB view, Parquet location of the
    current version, column schema, and its content hash as the Dagster data version
    (downstream assets of the round show stale only when the content changed)."""
    return dg.MaterializeResult(
        asset_key=table,
        metadata={
            "dagster/row_count": version.row_counts[table],
            "dagster/table_name": table,
            "dagster/uri": str(version.path(table).resolve()),
            "dagster/column_schema": table_schema(table),
            "version": version.version,
            **(metadata or {}),
        },
        data_version=dg.DataVersion(version.table_hashes[table]),
    )


def side_results(version: TableVersion, *tables: str) -> Iterator[dg.MaterializeResult]:
    """Results for those of `tables` written in `version` (a skipped one: none). A multi
    asset yields in lineage order: a step's upstream tables before their dependents."""
    for table in tables:
        if table in version.tables:
            yield table_result(version, table)


def preview(frame: pl.DataFrame, columns: list[str], rows: int = 5) -> dg.MetadataValue:
    return dg.MetadataValue.md(frame.select(columns).head(rows).to_pandas().to_markdown())


def parent_metadata(policy: str, parent: str | None) -> dict:
    """Which policy a step of the round used, and the round whose checkpoint it is."""
    return {"policy_checkpoint": policy, "parent_round": parent or "none (base model)"}
