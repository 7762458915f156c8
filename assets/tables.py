"""How a loop's round tables become Dagster assets: their specs (columns, DuckDB view,
the loop's group, the stage as a tag) and metadata helpers. Publishing and results are
`assets.loop.Step`'s."""

import dagster as dg
import polars as pl

from selfimprove_dagster.store import schemas

ROUND_KINDS = {"python", "parquet"}
STAGE_TAG = "selfimprove/stage"


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


def table_spec(loop, table: str, stage: str, deps=(), skippable: bool = False, **kwargs):
    """One of a loop's round tables as an asset of a multi-asset step: `<loop>/<table>`,
    its columns and its DuckDB view, in the loop's group, tagged with its stage."""
    return dg.AssetSpec(
        loop.key(table),
        deps=loop.keys(*deps),
        skippable=skippable,
        group_name=loop.name,
        kinds=kwargs.pop("kinds", ROUND_KINDS),
        description=kwargs.pop("description", None),
        metadata=kwargs.pop("metadata", table_metadata(table)),
        tags={STAGE_TAG: stage},
        **kwargs,
    )


def preview(frame: pl.DataFrame, columns: list[str], rows: int = 5) -> dg.MetadataValue:
    return dg.MetadataValue.md(frame.select(columns).head(rows).to_pandas().to_markdown())


def parent_metadata(policy: str, parent: str | None) -> dict:
    """Which policy a step of the round used, and the round whose checkpoint it is."""
    return {"policy_checkpoint": policy, "parent_round": parent or "none (base model)"}
