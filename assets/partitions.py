"""Rounds are dynamic partitions: `round_000`, `round_001`, ... added as the loop runs."""

import dagster as dg

ROUNDS = dg.DynamicPartitionsDefinition(name="rounds")
