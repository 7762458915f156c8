"""The loop's outcome as assets of their own: `promoted_policy` and `history`.

Neither is partitioned: each reads every round Dagster recorded and is rebuilt when a
round's `eval_scores` lands with its blocking checks passed.

    eval_scores (round_000, round_001, ...) ──► promoted_policy   (which checkpoint to serve)
                                            └─► history           (plot + table of all rounds)

They are materialized by Declarative Automation (`POLICY_AUTOMATION`: Dagster's
`eager()` — some round's eval_scores updated, none missing or in progress — and no
round's eval_scores with a failed blocking check), which `policy_automation_sensor`
(running by default) evaluates in the daemon (`dagster dev`, `selfimprove ui`); `selfimprove run`
materializes them in process after each round (`policy_job`).
"""

import dagster as dg

from assets.checks import ROUND_CHECKS
from assets.record import EVAL_SCORES, DagsterRecord, round_graph
from assets.rounds import ROUND_ASSETS
from resources import StorageResource
from selfimprove_dagster.evolution import history_table, promotion
from selfimprove_dagster.plots import markdown_image, render_history

# Dagster's `all_deps_blocking_checks_passed()` is true when ANY partition of a
# partitioned dep passed its checks (a dep counts as matched through one partition), so
# for an unpartitioned child of `eval_scores` it would fire after a failed round too.
# Here: no round's eval_scores may have a failed blocking check (a failed round stops
# the loop until a person re-runs it), and eager() supplies "some round updated, none
# missing or in progress".
NO_FAILED_BLOCKING_CHECKS = (
    ~dg.AutomationCondition.any_deps_match(
        dg.AutomationCondition.any_checks_match(
            dg.AutomationCondition.check_failed(), blocking_only=True
        )
    )
).with_label("no_dep_blocking_check_failed")
POLICY_AUTOMATION = dg.AutomationCondition.eager() & NO_FAILED_BLOCKING_CHECKS


def _record(context: dg.AssetExecutionContext, store) -> DagsterRecord:
    # policy_job runs without the round assets: read the record against their graph.
    graph = round_graph(context, ROUND_ASSETS, ROUND_CHECKS)
    return DagsterRecord(context.instance, graph, store.chain_problem)


@dg.asset(
    deps=[EVAL_SCORES],
    group_name="evolve",
    kinds={"parquet", "python"},
    automation_condition=POLICY_AUTOMATION,
)
def promoted_policy(
    context: dg.AssetExecutionContext, storage: StorageResource
) -> dg.MaterializeResult:
    """The checkpoint to serve: the best held-out accuracy among completed rounds (their
    blocking gates passed) that did not score below their policy; the base model when
    none qualifies. One row: round, checkpoint, accuracy, decided_after, reason
    (DuckDB view `promoted_policy`)."""
    store = storage.store()
    record = _record(context, store)
    chosen = promotion(store.eval_history(record.done_rounds()))
    path = store.write_promoted(chosen.frame())
    context.log.info(store.refresh_catalog())
    context.log.info(f"promoted policy: {chosen.reason}")
    return dg.MaterializeResult(
        metadata={
            "promoted_round": chosen.round or "none (base model)",
            "accuracy": chosen.accuracy,
            "checkpoint": chosen.checkpoint or "none (base model)",
            "decided_after": chosen.decided_after or "none",
            "reason": chosen.reason,
            "dagster/row_count": 1,
            "path": dg.MetadataValue.path(str(path)),
        }
    )


@dg.asset(
    deps=[EVAL_SCORES],
    group_name="evolve",
    kinds={"python"},
    automation_condition=POLICY_AUTOMATION,
)
def history(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Held-out accuracy, pass@k, kept fraction and B-STaR balance across every round
    with a recorded eval_scores (a round whose gate failed is shown, never promoted).
    Metadata: the plot and the table (round, kept, accuracy_before, accuracy_after,
    pass_at_k, promoted)."""
    store = storage.store()
    record = _record(context, store)
    materialized = [key for key in record.rounds() if record.round(key).materialized]
    rounds = store.eval_history(materialized)
    chosen = promotion(store.eval_history(record.done_rounds()))
    table = history_table(rounds, chosen.round)
    metadata = {
        "dagster/row_count": table.height,
        "promoted_round": chosen.round or "none (base model)",
        "history_table": dg.MetadataValue.md(
            table.to_pandas().to_markdown(index=False) if table.height else "no rounds yet"
        ),
    }
    if table.height:
        plot = render_history(rounds, store.plot_path("history.png"))
        metadata["history"] = dg.MetadataValue.md(markdown_image(plot))
        metadata["plot"] = dg.MetadataValue.path(str(plot))
    return dg.MaterializeResult(metadata=metadata)


POLICY_ASSETS = [promoted_policy, history]

# Dagster's implicit `default_automation_condition_sensor` starts STOPPED; this one
# (the same kind, over the policy assets) runs as soon as the daemon does.
policy_automation_sensor = dg.AutomationConditionSensorDefinition(
    "policy_automation_sensor",
    target=dg.AssetSelection.assets(*POLICY_ASSETS),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Materializes promoted_policy and history when a round's eval_scores "
    "lands with its blocking checks passed (their automation condition).",
)

policy_job = dg.define_asset_job(
    "policy_job",
    selection=dg.AssetSelection.assets(*POLICY_ASSETS),
    description="Rebuild promoted_policy and history from the rounds Dagster recorded "
    "(`selfimprove run` runs it after each round; the automation sensor does in the UI).",
)
