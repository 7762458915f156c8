"""Blocking gates of a round: a failed gate stops the assets downstream of it.

Check logic lives in `selfimprove_dagster.quality` (pure functions); these wrappers
read the round's table and convert the `GateResult`.
"""

import dagster as dg

from assets.partitions import ROUNDS
from assets.rounds import checkpoint, filtered
from resources import StorageResource, TrainerResource
from selfimprove_dagster import quality
from selfimprove_dagster.models import read_manifest


def to_check_result(gate: quality.GateResult) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=gate.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=gate.message,
        # Raw ints, floats, strings, lists and dicts become Dagster metadata values.
        metadata={"observed": gate.observed, "threshold": gate.threshold, **gate.details},
    )


@dg.asset_check(asset=filtered, blocking=True, partitions_def=ROUNDS)
def check_min_rows_filtered(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, trainer: TrainerResource
) -> dg.AssetCheckResult:
    """The filtered set has at least `min_filtered` rows (an empty round cannot train)."""
    frame = storage.store().read(context.partition_key, "filtered")
    return to_check_result(quality.gate_min_rows(frame, trainer.min_filtered))


@dg.asset_check(asset=filtered, blocking=True, partitions_def=ROUNDS)
def check_unique_generation_id_filtered(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """No generation is in the filtered set twice."""
    frame = storage.store().read(context.partition_key, "filtered")
    return to_check_result(quality.gate_unique_ids(frame, "generation_id"))


@dg.asset_check(asset=checkpoint, blocking=True, partitions_def=ROUNDS)
def check_training_ran_checkpoint(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """Training loss is finite and every planned optimizer step ran."""
    manifest = read_manifest(storage.store().checkpoint_dir(context.partition_key))
    return to_check_result(quality.gate_training_ran(manifest))


ROUND_CHECKS = [
    check_min_rows_filtered,
    check_unique_generation_id_filtered,
    check_training_ran_checkpoint,
]
