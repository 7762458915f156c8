"""The environment variable names of the resources' fields (for a loop that reads its
settings from the environment: `env_prefix`, SELFIMPROVE_ for the demo loop; the
resolution order is in `resources/settings.py`).

Two names reach a field, the more specific one wins:

    SELFIMPROVE_<RESOURCE>_<FIELD>   one resource's field, e.g. SELFIMPROVE_TRAINER_SEED
    SELFIMPROVE_<FIELD>              that field in EVERY resource that has one

So a field name that several resources share is one variable for all of them: today
`SELFIMPROVE_SEED` sets the task's, the generator's and the trainer's seed,
`SELFIMPROVE_BATCH_SIZE` the generator's and the trainer's, and
`SELFIMPROVE_REGRESSION_TOLERANCE` the stop rule's and the gate's
(`shared_variables()` lists them from the resource classes; docs/operations.md shows
the table). Use the per-resource name to set one of them.

Values are checked by the fields' own constraints (negative temperature, top_p above 1,
n_eval=0 ...) and a bad one is one `SelfImproveError` naming the variable.
`check_environment()` refuses a `SELFIMPROVE_*` name that no resource field or
documented setting has, and names the closest valid one. The known names are read from
the resource classes at call time, so a field added to a resource is known at once.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping

import dagster as dg

from selfimprove_dagster.errors import SelfImproveError

ENV_PREFIX = "SELFIMPROVE_"

# SELFIMPROVE_* settings that are not resource fields.
OTHER_VARIABLES: dict[str, str] = {
    "SELFIMPROVE_PROFILE": "local (default), gpu or cluster (selfimprove_dagster/profiles.py)",
    "SELFIMPROVE_OPENAI_API_KEY": "API key of the openai engine's server (never in config)",
    "SELFIMPROVE_IMAGE": "cluster profile: the run and step pods' image (deploy/dagster.yaml)",
    "SELFIMPROVE_TEST_GPU": "tests: run the GPU tests (1)",
}


def resource_prefix(cls: type) -> str:
    """`GeneratorResource` -> `GENERATOR`: the per-resource part of a variable name."""
    name = cls.__name__
    return (name[: -len("Resource")] if name.endswith("Resource") else name).upper()


def field_variables(
    cls: type[dg.ConfigurableResource], name: str, prefix: str = ENV_PREFIX
) -> tuple[str, str]:
    """(per-resource variable, shared variable) of one field."""
    return (
        f"{prefix}{resource_prefix(cls)}_{name.upper()}",
        f"{prefix}{name.upper()}",
    )


def resource_classes() -> list[type[dg.ConfigurableResource]]:
    """Every resource class the `resources` package exports (read at call time)."""
    from selfimprove_dagster import resources

    found = []
    for name in getattr(resources, "__all__", dir(resources)):
        value = getattr(resources, name, None)
        if isinstance(value, type) and issubclass(value, dg.ConfigurableResource):
            found.append(value)
    return found


def known_variables(classes: Iterable[type] | None = None) -> set[str]:
    """Every valid `SELFIMPROVE_*` name: both names of every field, and the others."""
    names = set(OTHER_VARIABLES)
    for cls in resource_classes() if classes is None else classes:
        for field in cls.model_fields:
            names.update(field_variables(cls, field))
    return names


def shared_variables(classes: Iterable[type] | None = None) -> dict[str, list[str]]:
    """Shared variables that set more than one field: name -> ["Resource.field", ...]."""
    fields: dict[str, list[str]] = {}
    for cls in resource_classes() if classes is None else classes:
        for field in cls.model_fields:
            fields.setdefault(field_variables(cls, field)[1], []).append(f"{cls.__name__}.{field}")
    return {name: owners for name, owners in sorted(fields.items()) if len(owners) > 1}


def check_environment(
    environ: Mapping[str, str] | None = None, classes: Iterable[type] | None = None
) -> None:
    """Refuse a `SELFIMPROVE_*` variable that nothing reads (a typo would otherwise be
    silently ignored), naming the closest valid name."""
    env = os.environ if environ is None else environ
    known = known_variables(classes)
    unknown = sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in known)
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise SelfImproveError(
        f"Unknown setting {', '.join(hints)}: no resource has that field",
        "fix the name or unset it; the valid names are the resources' fields "
        "(docs/operations.md, Settings)",
    )
