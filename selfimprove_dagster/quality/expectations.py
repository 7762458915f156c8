"""Great Expectations 1.x suites for a round's tables, run on Polars frames.

dagster-ge only supports GE < 1, so the asset checks call GE directly through
`validate_table`, which converts the frame to pandas, validates it against the table's
suite in an ephemeral GE context and returns a `SuiteResult` whose failures name the
expectation, the column, what was observed and a few offending values or rows:

    result = validate_table("generations", frame, max_new_tokens=64)
    result.passed, result.failures[:1]

Great Expectations is imported inside the functions: it takes seconds to import, and
the core library must import light. A call costs ~0.1 s once GE is imported (a fresh
ephemeral context is a few milliseconds), so nothing is cached across calls.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.store.schemas import required_columns

# Offending values or rows reported per failed expectation.
MAX_EXAMPLES = 5
# Long texts (prompts, completions) are cut to this many characters in examples.
MAX_EXAMPLE_CHARS = 80
# Columns that identify a row; examples of null values show these instead of the null.
ROW_KEYS = ("round", "generation_id", "prompt_id", "sample_index")


@dataclass
class SuiteResult:
    suite: str  # the table name the suite belongs to
    passed: bool
    evaluated: int  # expectations evaluated (column missing -> one failure, others skipped)
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def message(self) -> str:
        """One line for a check description: what passed, or which expectations failed."""
        if self.passed:
            return f"`{self.suite}`: all {self.evaluated} expectations passed"
        failed = "; ".join(
            f"{f['expectation']}({f['column'] or ''}): {f['observed']}" for f in self.failures
        )
        counts = f"{len(self.failures)}/{self.evaluated}"
        return f"`{self.suite}`: {counts} expectations failed: {failed}"


# --- suites: one builder per table, each returns a list of GE expectations -------------
# The columns each suite expects to exist are `store.schemas.required_columns(table)`,
# the same declaration the Dagster assets show as their column schema.


def _exist(gxe: Any, *columns: str) -> list:
    return [gxe.ExpectColumnToExist(column=c) for c in columns]


def _not_null(gxe: Any, *columns: str) -> list:
    return [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in columns]


def prompts_suite(**bounds: Any) -> list:
    """Problems of a round: ids and texts present, known split, prompt of sane length."""
    import great_expectations.expectations as gxe

    max_prompt_chars = bounds.get("max_prompt_chars", 4000)
    return [
        *_exist(gxe, *required_columns("prompts")),
        *_not_null(gxe, "prompt_id", "prompt"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "eval"]),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="prompt", min_value=1, max_value=max_prompt_chars
        ),
    ]


def generations_suite(**bounds: Any) -> list:
    """Sampled completions: ids and texts present, token counts within the sampling budget."""
    import great_expectations.expectations as gxe

    max_new_tokens = bounds.get("max_new_tokens")
    # Engines may count the end-of-sequence token as one more generated token.
    max_tokens = None if max_new_tokens is None else int(max_new_tokens) + 1
    return [
        *_exist(gxe, *required_columns("generations")),
        *_not_null(gxe, "generation_id", "prompt_id", "prompt", "completion"),
        gxe.ExpectColumnValuesToBeBetween(
            column="completion_tokens", min_value=0, max_value=max_tokens
        ),
        gxe.ExpectColumnValuesToBeInSet(column="finish_reason", value_set=["stop", "length"]),
        gxe.ExpectColumnValuesToBeBetween(column="temperature", min_value=0),
        gxe.ExpectColumnValuesToBeUnique(column="generation_id"),
    ]


def critiques_suite(**bounds: Any) -> list:
    """Verdicts: one per generation, from a named critic, in the allowed set, score in [0, 1]."""
    import great_expectations.expectations as gxe

    return [
        *_exist(gxe, *required_columns("critiques")),
        *_not_null(gxe, "generation_id", "critic"),
        gxe.ExpectColumnValuesToBeInSet(column="verdict", value_set=["accept", "reject"]),
        gxe.ExpectColumnValuesToBeBetween(column="score", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="generation_id"),
    ]


def filtered_suite(**bounds: Any) -> list:
    """The training set: every row a non-empty completion, once, from a known source."""
    import great_expectations.expectations as gxe

    return [
        *_exist(gxe, *required_columns("filtered")),
        *_not_null(gxe, "generation_id", "prompt_id", "prompt", "completion"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="completion", min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="generation_id"),
        gxe.ExpectColumnValuesToBeInSet(
            column="source", value_set=["generated", "refined", "rationalized", "rl_prompt"]
        ),
    ]


def eval_details_suite(**bounds: Any) -> list:
    """Per held-out prompt scores: one row per prompt, pass@k a probability where sampled."""
    import great_expectations.expectations as gxe

    return [
        *_exist(gxe, *required_columns("eval_details")),
        *_not_null(gxe, "prompt_id", "greedy_correct"),
        gxe.ExpectColumnValuesToBeUnique(column="prompt_id"),
        # Nulls (prompts not sampled for pass@k) are skipped by GE's column-map expectations.
        gxe.ExpectColumnValuesToBeBetween(column="pass_at_k", min_value=0, max_value=1),
    ]


# Rewards and advantages are finite: |x| below this (GE has no isfinite; pandas reads
# NaN as null, so the not-null expectation catches NaN and this bound catches inf).
FINITE_BOUND = 1e12


def rollouts_suite(**bounds: Any) -> list:
    """Online RL rollouts (`methods.grpo.rollout_rows`): one row per rollout, id unique,
    phase `rollout`, optimizer step >= 1, a verdict, reward and advantage finite."""
    import great_expectations.expectations as gxe

    return [
        *_exist(gxe, *required_columns("rollouts")),
        *_not_null(gxe, "generation_id", "prompt_id", "completion", "step", "reward"),
        gxe.ExpectColumnValuesToBeUnique(column="generation_id"),
        gxe.ExpectColumnValuesToBeInSet(column="phase", value_set=["rollout"]),
        gxe.ExpectColumnValuesToBeBetween(column="step", min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="verdict", value_set=["accept", "reject"]),
        gxe.ExpectColumnValuesToBeBetween(
            column="reward", min_value=-FINITE_BOUND, max_value=FINITE_BOUND
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="advantage", min_value=-FINITE_BOUND, max_value=FINITE_BOUND
        ),
        gxe.ExpectColumnValuesToBeBetween(column="score", min_value=0, max_value=1),
    ]


SUITES: dict[str, Callable[..., list]] = {
    "prompts": prompts_suite,
    "generations": generations_suite,
    "critiques": critiques_suite,
    "filtered": filtered_suite,
    "eval_details": eval_details_suite,
    "rollouts": rollouts_suite,
}


# --- validation --------------------------------------------------------------------


def validate_table(table: str, frame: pl.DataFrame, **bounds: Any) -> SuiteResult:
    """Validate `frame` against the suite of `table` (a key of `SUITES`).

    `bounds` tune a suite (`max_new_tokens` for generations; taken from the frame's
    `max_new_tokens` column when not given). An empty frame still validates its schema:
    each missing column is one failure, and expectations on it are skipped.
    """
    if table not in SUITES:
        raise SelfImproveError(
            f"no expectation suite for table `{table}`", f"use one of {sorted(SUITES)}"
        )
    if table == "generations" and "max_new_tokens" not in bounds:
        bounds["max_new_tokens"] = _column_max(frame, "max_new_tokens")
    expectations = [e for e in SUITES[table](**bounds) if _applies(e, frame.columns)]
    results = _run_suite(table, frame, expectations)
    failures = [_failure(r, frame) for r in results if not r.success]
    return SuiteResult(table, not failures, len(results), failures)


def _column_max(frame: pl.DataFrame, column: str) -> int | None:
    if column not in frame.columns or frame[column].null_count() == frame.height:
        return None
    return int(frame[column].max())


def _applies(expectation: Any, columns: list[str]) -> bool:
    """Column-existence expectations always run; the others only on present columns."""
    column = getattr(expectation, "column", None)
    return type(expectation).__name__ == "ExpectColumnToExist" or column in columns


def _run_suite(name: str, frame: pl.DataFrame, expectations: list) -> list:
    """Validate in a fresh ephemeral context: pandas datasource, dataframe asset, batch."""
    # Opt out of GE usage statistics before GE is imported (a no-op in builds without them).
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # A tqdm bar per validation would flood the Dagster run log.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas(f"{name}_source")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(f"{name}_whole")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
    for expectation in expectations:
        suite.add_expectation(expectation)
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame.to_pandas()})
    format_ = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES}
    return list(batch.validate(suite, result_format=format_).results)


def _failure(result: Any, frame: pl.DataFrame) -> dict[str, Any]:
    """A failed expectation as plain data: type, column, short observation, examples."""
    config = result.expectation_config
    column = config.kwargs.get("column")
    details = result.result or {}
    error = _exception_message(result.exception_info)
    if error:
        observed, examples = f"error: {error[:200]}", []
    elif config.type == "expect_column_to_exist":
        observed, examples = f"column missing (columns: {', '.join(frame.columns)})", []
    elif "unexpected_count" in details:
        observed = f"{details['unexpected_count']} of {details.get('element_count')} rows"
        if config.type == "expect_column_values_to_not_be_null":
            # The offending value is a null: show which rows carry it.
            examples = _rows(frame, details.get("partial_unexpected_index_list") or [], column)
        else:
            # A duplicated id shows up once per copy: list each offending value once.
            values = details.get("partial_unexpected_list") or []
            examples = list(dict.fromkeys(_plain(v) for v in values))
    else:
        observed, examples = str(details.get("observed_value"))[:200], []
    return {
        "expectation": config.type,
        "column": column,
        "observed": observed,
        "examples": examples[:MAX_EXAMPLES],
    }


def _exception_message(info: Any) -> str | None:
    """GE reports errors either flat or keyed by metric; return the first message."""
    if not info:
        return None
    entries = [info] if "raised_exception" in info else list(info.values())
    for entry in entries:
        entry = entry if isinstance(entry, dict) else getattr(entry, "to_json_dict", dict)()
        if entry.get("raised_exception"):
            return str(entry.get("exception_message") or "unknown error")
    return None


def _rows(frame: pl.DataFrame, indices: list[int], column: str | None) -> list[dict[str, Any]]:
    keys = [c for c in (*ROW_KEYS, column) if c in frame.columns]
    picked = frame.select(list(dict.fromkeys(keys))).with_row_index("row")
    rows = picked.filter(pl.col("row").is_in(indices[:MAX_EXAMPLES])).to_dicts()
    return [{k: _plain(v) for k, v in row.items()} for row in rows]


def _plain(value: Any) -> Any:
    """A JSON-friendly, short version of a value GE found (numpy scalars, NaN, long text)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and len(value) > MAX_EXAMPLE_CHARS:
        return value[:MAX_EXAMPLE_CHARS] + "…"
    return value
