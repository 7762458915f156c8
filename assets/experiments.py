"""`experiments`: every loop's rounds side by side (one row per loop and round), with a
plot of held-out accuracy per round per loop, rebuilt when any loop's round is recorded.

    loop  round  method  base_model  task  kept  accuracy_before  accuracy_after
    pass_at_k  wall_seconds  done  promoted                (selfimprove_dagster.experiments)

The table lives in the deployment's data dir (`experiments.parquet`, DuckDB view
`experiments` in its catalog), so SQL compares loops without opening each loop's data.
"""

from collections.abc import Callable, Mapping

import dagster as dg

from selfimprove_dagster.assets.loop import Loop
from selfimprove_dagster.assets.record import DagsterRecord, RoundGraph
from selfimprove_dagster.evolution import promotion
from selfimprove_dagster.experiments import compare, experiment_rows
from selfimprove_dagster.plots import markdown_image, render_experiments
from selfimprove_dagster.resources.settings import deployment_data_dir
from selfimprove_dagster.store.storage import RoundStore

EXPERIMENTS_AUTOMATION = dg.AutomationCondition.eager()


def round_wall_seconds(instance: dg.DagsterInstance, record: DagsterRecord) -> dict:
    """Round -> seconds its latest recorded run took (start to end), where known."""
    seconds = {}
    for round_ in record.rounds():
        latest = record.latest(record.loop.key("eval_scores"), round_)
        stats = instance.get_run_stats(latest.run_id) if latest and latest.run_id else None
        if stats is not None and stats.start_time and stats.end_time:
            seconds[round_] = round(stats.end_time - stats.start_time, 1)
    return seconds


def loop_rows(instance: dg.DagsterInstance, name: str, info: Mapping, graph: RoundGraph):
    """One loop's experiment rows, read from its record and its round store."""
    store = RoundStore.at(info["data_dir"])
    record = DagsterRecord(instance, graph, store.chain_problem)
    materialized = [r for r in record.rounds() if record.round(r).materialized]
    done = record.done_rounds()
    promoted = promotion(store.eval_history(done)).round
    return experiment_rows(
        name, info, store.eval_history(materialized), done, promoted,
        round_wall_seconds(instance, record),
    )  # fmt: skip


def experiments_definitions(
    loops: Mapping[str, Mapping], repository: Callable[[], dg.RepositoryDefinition]
) -> dg.Definitions:
    """The `experiments` asset over `loops` (name -> `assets.rounds.loop_info`), the job
    that rebuilds it and the automation sensor that runs it when a round lands.
    `repository()` gives the loops' definitions (their gates say which rounds are done)."""
    if not loops:
        return dg.Definitions()
    root = deployment_data_dir()

    @dg.asset(
        key="experiments",
        deps=[Loop(name).key("eval_scores") for name in loops],
        group_name="experiments",
        kinds={"parquet", "python"},
        automation_condition=EXPERIMENTS_AUTOMATION,
    )
    def experiments(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Every loop's rounds side by side: loop, round, method, base_model, task, kept,
        accuracy_before, accuracy_after, pass_at_k, wall_seconds, done, promoted; a plot
        of held-out accuracy per round per loop (DuckDB view `experiments`)."""
        repo = repository()
        frames = [
            loop_rows(context.instance, name, info, RoundGraph.of(repo, Loop(name)))
            for name, info in loops.items()
        ]
        frame = compare(frames)
        store = RoundStore.at(root)
        path = store.write_experiments(frame)
        context.log.info(store.refresh_catalog())
        plot = render_experiments(frame, store.plot_path("experiments.png"))
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": frame.height,
                "loops": ", ".join(loops),
                "table": dg.MetadataValue.md(
                    frame.to_pandas().to_markdown(index=False, floatfmt=".4g")
                ),
                "accuracy_per_round": dg.MetadataValue.md(
                    markdown_image(plot, "held-out accuracy per round, per loop")
                ),
                "path": dg.MetadataValue.path(str(path)),
            }
        )

    sensor = dg.AutomationConditionSensorDefinition(
        "experiments_automation_sensor",
        target=dg.AssetSelection.assets(experiments),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description="Rebuilds `experiments` when any loop's round lands.",
    )
    job = dg.define_asset_job(
        "experiments_job",
        selection=dg.AssetSelection.assets(experiments),
        description="Rebuild the cross-loop `experiments` table (`selfimprove run` runs it "
        "after each round).",
    )
    return dg.Definitions(assets=[experiments], jobs=[job], sensors=[sensor])
