"""`from_env`: a resource whose fields come from `SELFIMPROVE_<FIELD>` environment variables."""

from __future__ import annotations

import os
from typing import TypeVar

import dagster as dg
from pydantic import ValidationError

from selfimprove_dagster.errors import SelfImproveError

ENV_PREFIX = "SELFIMPROVE_"
R = TypeVar("R", bound=dg.ConfigurableResource)


def from_env(cls: type[R], **fixed: object) -> R:
    """`cls(...)` with each field taken from `SELFIMPROVE_<FIELD>` when that is set."""
    values: dict[str, object] = {}
    for name in cls.model_fields:
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            # pydantic coerces "3" -> 3, "0.8" -> 0.8, "true" -> True; lists are "0.6,0.8".
            is_list = getattr(cls.model_fields[name].annotation, "__origin__", None) is list
            values[name] = raw.split(",") if is_list else raw
    values.update(fixed)
    try:
        return cls(**values)
    except ValidationError as error:
        bad = ", ".join(
            f"{ENV_PREFIX}{str(e['loc'][0]).upper()}={e.get('input')!r} ({e['msg']})"
            for e in error.errors()
        )
        raise SelfImproveError(
            f"Invalid setting for {cls.__name__}: {bad}",
            "set the environment variable to a value of the field's type (see README, "
            "Configuration)",
        ) from None
