"""A loop's outcome as assets of its own: `<loop>/promoted_policy` and `<loop>/history`.

Neither is partitioned: each reads every round Dagster recorded and is rebuilt when a
round's `eval_scores` lands with its blocking checks passed.

    eval_scores (round_000, round_001, ...) ──► promoted_policy   (which checkpoint to serve)
                                            └─► history           (plot + table of all rounds)

They are materialized by Declarative Automation (`POLICY_AUTOMATION`: Dagster's
`eager()` — some round's eval_scores updated, none missing or in progress), which
`<loop>_policy_automation_sensor` (running by default) evaluates in the daemon
(`dagster dev`, `selfimprove ui`); `selfimprove run` materializes them in process after
each round (`<loop>_policy_job`). They follow every recorded round, one whose gate
failed too: each reads which rounds are done from Dagster's record, so a failed round
is shown (`done` false) and never promoted, and neither asset is left Unsynced beside a
materialized eval_scores.
"""

import dagster as dg

from selfimprove_dagster.assets.loop import Loop
from selfimprove_dagster.assets.record import DagsterRecord, round_graph
from selfimprove_dagster.evolution import history_table, promotion
from selfimprove_dagster.plots import markdown_image, render_history

POLICY_AUTOMATION = dg.AutomationCondition.eager()


def policy_assets(loop: Loop, round_assets, round_checks) -> list[dg.AssetsDefinition]:
    """`promoted_policy` and `history` of one loop (its policy job runs without the
    round assets, so the record is read against `round_assets` and `round_checks`)."""

    def record(context, store) -> DagsterRecord:
        graph = round_graph(context, loop, round_assets, round_checks)
        return DagsterRecord(context.instance, graph, store.chain_problem)

    @dg.asset(
        key=loop.key("promoted_policy"),
        deps=[loop.key("eval_scores")],
        group_name=loop.name,
        kinds={"parquet", "python"},
        automation_condition=POLICY_AUTOMATION,
        required_resource_keys=loop.resource_keys("storage"),
    )
    def promoted_policy(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """The checkpoint to serve: the best held-out accuracy among done rounds (their
        blocking gates passed, their chain current) that did not score below their
        policy; the base model when none qualifies. One row: round, checkpoint,
        accuracy, decided_after, reason (DuckDB view `promoted_policy`)."""
        store = loop.settings(context).storage.store()
        chosen = promotion(store.eval_history(record(context, store).done_rounds()))
        path = store.write_promoted(chosen.frame())
        context.log.info(store.refresh_catalog())
        context.log.info(f"promoted policy: {chosen.reason}")
        return dg.MaterializeResult(
            metadata={
                "promoted_round": chosen.round or "none (base model)",
                "accuracy": round(chosen.accuracy, 4) if chosen.accuracy is not None else None,
                "checkpoint": chosen.checkpoint or "none (base model)",
                "decided_after": chosen.decided_after or "none",
                "reason": chosen.reason,
                "dagster/row_count": 1,
                "path": dg.MetadataValue.path(str(path)),
            }
        )

    @dg.asset(
        key=loop.key("history"),
        deps=[loop.key("eval_scores")],
        group_name=loop.name,
        kinds={"python"},
        automation_condition=POLICY_AUTOMATION,
        required_resource_keys=loop.resource_keys("storage"),
    )
    def history(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Held-out accuracy, pass@k, kept fraction and B-STaR balance across every round
        with a recorded eval_scores (a round whose gate failed is shown, never promoted).
        Metadata: the plot and the table (round, kept, accuracy_before, accuracy_after,
        pass_at_k, promoted)."""
        store = loop.settings(context).storage.store()
        reader = record(context, store)
        materialized = [key for key in reader.rounds() if reader.round(key).materialized]
        rounds = store.eval_history(materialized)
        done = reader.done_rounds()
        chosen = promotion(store.eval_history(done))
        table = history_table(rounds, chosen.round, done)
        metadata = {
            "dagster/row_count": table.height,
            "promoted_round": chosen.round or "none (base model)",
            "history_table": dg.MetadataValue.md(
                table.to_pandas().to_markdown(index=False, floatfmt=".4g")
                if table.height
                else "no rounds yet"
            ),
        }
        if table.height:
            plot = render_history(rounds, store.plot_path("history.png"))
            metadata["history"] = dg.MetadataValue.md(markdown_image(plot))
            metadata["plot"] = dg.MetadataValue.path(str(plot))
        return dg.MaterializeResult(metadata=metadata)

    return [promoted_policy, history]


def policy_definitions(loop: Loop, round_assets, round_checks):
    """The policy assets, the job that rebuilds them, and the automation sensor."""
    assets = policy_assets(loop, round_assets, round_checks)
    # Dagster's implicit `default_automation_condition_sensor` starts STOPPED; this one
    # (the same kind, over the policy assets) runs as soon as the daemon does.
    sensor = dg.AutomationConditionSensorDefinition(
        f"{loop.name}_policy_automation_sensor",
        target=dg.AssetSelection.assets(*assets),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description=f"Materializes `{loop.name}`'s promoted_policy and history when a round's "
        "eval_scores lands with its blocking checks passed (their automation condition).",
    )
    job = dg.define_asset_job(
        loop.policy_job_name,
        selection=dg.AssetSelection.assets(*assets),
        description=f"Rebuild `{loop.name}`'s promoted_policy and history from the rounds "
        "Dagster recorded (`selfimprove run` runs it after each round; the automation "
        "sensor does in the UI).",
    )
    return assets, job, sensor
