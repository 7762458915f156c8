"""`<loop>_add_round_job`: add a round partition from the Launchpad.

A partitioned job's Launchpad offers the partitions that exist; only the Materialize
dialog can add one. This job adds one (the next round after the last, or the one its
config names), so a person working from the Launchpad can then launch
`<loop>_round_job` for it. The sensor and `selfimprove run` add partitions themselves.
"""

import dagster as dg
from pydantic import Field

from selfimprove_dagster.assets.loop import Loop
from selfimprove_dagster.store.storage import round_index, round_key


class AddRoundConfig(dg.Config):
    round: str = Field(
        default="", description="The round to add, e.g. round_003 (empty: the next one)."
    )


def add_round_job(loop: Loop) -> dg.JobDefinition:
    @dg.op(
        name=f"{loop.name}_add_round",
        description=f"Adds a round partition to loop `{loop.name}` (default: the next one).",
    )
    def add_round(context: dg.OpExecutionContext, config: AddRoundConfig) -> str:
        name = loop.partitions.name
        known = sorted(context.instance.get_dynamic_partitions(name), key=round_index)
        key = config.round or round_key(round_index(known[-1]) + 1 if known else 0)
        round_index(key)  # a malformed key is refused with its fix
        if key in known:
            context.log.info(f"{key} already exists in {name}")
        else:
            context.instance.add_dynamic_partitions(name, [key])
            context.log.info(f"added {key} to {name}: launch {loop.job_name} for it")
        return key

    @dg.job(
        name=f"{loop.name}_add_round_job",
        description=f"Add a round partition to `{loop.name}` (then launch its round job).",
    )
    def job() -> None:
        add_round()

    return job
