"""Lineage queries over the DuckDB catalog: what a checkpoint was trained on, and
where a generation went.

    checkpoint_lineage(store, "round_002")   # filtered rows -> generations -> policy, T
    generation_lineage(store, "5d142a3b...")  # verdict -> kept? -> checkpoint -> later rounds
"""

from __future__ import annotations

from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.store.storage import ROUND_PATTERN, RoundStore


def _connect(store: RoundStore):
    import duckdb

    if not store.catalog_path.is_file():
        raise SelfImproveError(
            f"No catalog at {store.catalog_path}", "run a round first (`selfimprove run`)"
        )
    return duckdb.connect(str(store.catalog_path), read_only=True)


def _rows(con, sql: str, *params: Any) -> list[dict[str, Any]]:
    cursor = con.execute(sql, list(params))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def checkpoint_lineage(store: RoundStore, round_: str) -> dict[str, Any]:
    """The checkpoint of `round_`: its manifest row, and every filtered row it was
    trained on with the generation's round, policy and sampling settings."""
    if not ROUND_PATTERN.match(round_):
        raise SelfImproveError(f"`{round_}` is not a round key", "use e.g. round_002")
    with _connect(store) as con:
        checkpoint = _rows(con, "SELECT * FROM checkpoints WHERE round = ?", round_)
        if not checkpoint:
            raise SelfImproveError(
                f"{round_} has no checkpoint in the catalog", "materialize the round first"
            )
        # A refined row (Self-Refine) descends from the sample it rewrote.
        trained_on = _rows(
            con,
            f"""
            SELECT f.generation_id, g.round, g.policy, g.temperature, g.top_p, g.top_k,
                   g.seed, f.source, r.parent_generation_id AS refined_from, r.feedback,
                   f.prompt_id, f.prompt, f.completion
            FROM filtered f
            LEFT JOIN {_refinements(con)} r USING (generation_id)
            JOIN generations g
              ON g.generation_id = coalesce(r.parent_generation_id, f.generation_id)
            WHERE f.round = ?
            ORDER BY f.prompt_id, f.generation_id
            """,
            round_,
        )
    return {"checkpoint": checkpoint[0], "trained_on": trained_on}


def generation_lineage(store: RoundStore, generation_id: str) -> dict[str, Any]:
    """A generation, its critique, whether it was kept, the checkpoint trained on it,
    and the later rounds whose policy descends from that checkpoint. A refined answer's
    id gives its refinement (feedback, original answer) and the sample it rewrote."""
    with _connect(store) as con:
        refinement = _rows(
            con,
            f"SELECT * FROM {_refinements(con)} WHERE generation_id = ?",
            generation_id,
        )
        sampled_id = refinement[0]["parent_generation_id"] if refinement else generation_id
        generation = _rows(con, "SELECT * FROM generations WHERE generation_id = ?", sampled_id)
        if not generation and "rollouts" in _views(con):  # an online RL round's rollout
            rollout = _rows(con, "SELECT * FROM rollouts WHERE generation_id = ?", generation_id)
            if rollout:
                return _rollout_lineage(con, rollout[0])
        if not generation:
            raise SelfImproveError(
                f"No generation `{generation_id}` in the catalog",
                "copy an id from the generations table (`selfimprove lineage round_NNN`)",
            )
        critiques = _rows(con, "SELECT * FROM critiques WHERE generation_id = ?", generation_id)
        kept = _rows(
            con,
            """
            SELECT f.round, c.path AS checkpoint
            FROM filtered f LEFT JOIN checkpoints c ON c.round = f.round
            WHERE f.generation_id = ?
            """,
            generation_id,
        )
        descendants = _descendant_rounds(con, kept[0]["checkpoint"]) if kept else []
    return {
        "generation": generation[0],
        "refinement": refinement[0] if refinement else None,
        "critiques": critiques,
        "trained_into": kept[0] if kept else None,
        "descendant_rounds": descendants,
    }


def _views(con) -> set[str]:
    return {row[0] for row in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}


def _rollout_lineage(con, rollout: dict[str, Any]) -> dict[str, Any]:
    """A grpo/rloo rollout: it is its own critique (reward, advantage) and was trained
    on directly, in its optimizer step, by its round's checkpoint."""
    checkpoint = _rows(
        con, "SELECT round, path AS checkpoint FROM checkpoints WHERE round = ?", rollout["round"]
    )
    trained = checkpoint[0] if checkpoint else None
    return {
        "generation": rollout,
        "refinement": None,
        "critiques": [rollout],
        "trained_into": trained,
        "descendant_rounds": _descendant_rounds(con, trained["checkpoint"]) if trained else [],
    }


def _refinements(con) -> str:
    """The `refinements` view, or an empty stand-in before any round refined."""
    views = {row[0] for row in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    if "refinements" in views:
        return "refinements"
    return (
        "(SELECT NULL::VARCHAR AS generation_id, NULL::VARCHAR AS parent_generation_id, "
        "NULL::VARCHAR AS feedback WHERE false)"
    )


def _descendant_rounds(con, checkpoint: str | None) -> list[str]:
    """Rounds generated by `checkpoint`, or by a checkpoint trained on top of it."""
    found: list[str] = []
    frontier = [checkpoint] if checkpoint else []
    while frontier:
        rows = _rows(
            con,
            f"""
            SELECT DISTINCT g.round, c.path AS checkpoint
            FROM generations g LEFT JOIN checkpoints c ON c.round = g.round
            WHERE g.policy IN ({", ".join("?" for _ in frontier)})
            ORDER BY g.round
            """,
            *frontier,
        )
        new = [r for r in rows if r["round"] not in found]
        found += [r["round"] for r in new]
        frontier = [r["checkpoint"] for r in new if r["checkpoint"]]
    return found
