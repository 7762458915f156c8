"""A loop's settings: seven groups, one per resource, declared once (the resources'
fields: name, type, default, description, range) and resolved in one order.

    task  generator  trainer  method  gates  evolution  storage

Where a setting comes from, the first that has it wins:

    1. run config               the Launchpad / `run_config` of one run (resources.<loop>_<group>)
    2. the loop's YAML          its `defs.yaml` attributes, after `{{ env('X', 'default') }}`
    3. environment variables    `<env_prefix><FIELD>` / `<env_prefix><GROUP>_<FIELD>`, only
                                for a loop that declares an `env_prefix` (the demo loop:
                                SELFIMPROVE_, so today's variables keep working for it)
    4. the profile's defaults   SELFIMPROVE_PROFILE=gpu|cluster (selfimprove_dagster/profiles.py)
    5. the field's default

`group_model(group)` is the YAML schema of a group, generated from its resource class
(so `dg check defs` and the component's JSON schema know every field); an unknown key
is refused with the closest valid name. `resolve_settings(...)` builds the resources.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from functools import cache
from typing import Any, ClassVar

import dagster as dg
from pydantic import Field, ValidationError, create_model, model_validator

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.resources.env import field_variables
from selfimprove_dagster.resources.evolution import EvolutionResource
from selfimprove_dagster.resources.gates import GatesResource
from selfimprove_dagster.resources.generator import GeneratorResource
from selfimprove_dagster.resources.method import MethodResource
from selfimprove_dagster.resources.storage import StorageResource
from selfimprove_dagster.resources.task import TaskResource
from selfimprove_dagster.resources.trainer import TrainerResource

# The settings groups of a loop, in the order they are documented.
GROUPS: dict[str, type[dg.ConfigurableResource]] = {
    "task": TaskResource,
    "generator": GeneratorResource,
    "trainer": TrainerResource,
    "method": MethodResource,
    "gates": GatesResource,
    "evolution": EvolutionResource,
    "storage": StorageResource,
}


class SettingsGroup(dg.Model, dg.Resolvable):
    """A settings group in a loop's YAML. Its schema is generated from the group's
    resource class (`group_model`); a key the resource does not have is refused with
    the closest valid name (also in the model Dagster derives to read YAML)."""

    group: ClassVar[str] = ""

    @classmethod
    def check_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key in data:
                if key not in GROUPS[cls.group].model_fields:
                    raise ValueError(unknown_key_message(cls.group, str(key)))
        return data

    @classmethod
    def model(cls) -> type:
        return _checked_model(cls)


@cache
def _checked_model(cls: type[SettingsGroup]) -> type:
    from dagster.components.resolved.base import derive_model_type

    derived = derive_model_type(cls)  # what Dagster derives to read the YAML
    return create_model(
        derived.__name__,
        __base__=derived,
        __validators__={
            "known_keys_only": model_validator(mode="before")(
                classmethod(lambda _model, data: cls.check_keys(data))
            )
        },
    )


@cache
def group_model(group: str) -> type[SettingsGroup]:
    """The YAML schema of one settings group: every field of its resource, optional
    (unset: the next source in the order decides), with the same description. Ranges are
    checked once, by the resource itself, when the loop's settings are resolved (a
    component's schema cannot carry pydantic constraints)."""
    cls = GROUPS[group]
    fields: dict[str, Any] = {
        name: (info.annotation | None, Field(default=None, description=info.description))
        for name, info in cls.model_fields.items()
    }
    model = create_model(
        f"{group.title()}Settings",
        __base__=SettingsGroup,
        __doc__=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None,
        __validators__={
            "known_keys_only": model_validator(mode="before")(
                classmethod(lambda model_cls, data: model_cls.check_keys(data))
            )
        },
        **fields,
    )
    model.group = group
    return model


def unknown_key_message(group: str, key: str) -> str:
    valid = list(GROUPS[group].model_fields)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(valid)}"
    return f"unknown setting `{key}` in group `{group}`{hint}"


def resolve_settings(
    loop: str,
    groups: Mapping[str, Mapping[str, Any]],
    env_prefix: str = "",
    environ: Mapping[str, str] | None = None,
    profile_defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dg.ConfigurableResource]:
    """One resource per group: YAML values over `<env_prefix>*` variables (when the loop
    has a prefix) over the profile's defaults over the fields' defaults. A value out of
    its field's range is one SelfImproveError naming the loop, the group and the field."""
    env = os.environ if environ is None else environ
    profile_defaults = {g: dict(v) for g, v in (profile_defaults or {}).items()}
    # A profile's data dir is the deployment's (each loop keeps its rounds below it).
    root = profile_defaults.get("storage", {}).pop("data_dir", None)
    resolved = {}
    for group, cls in GROUPS.items():
        values = dict(profile_defaults.get(group, {}))
        source = {name: "the profile" for name in values}
        if env_prefix:
            for name, (value, variable) in env_values(cls, group, env_prefix, env).items():
                values[name], source[name] = value, variable
        for name, value in (groups.get(group) or {}).items():
            if value is not None:
                values[name], source[name] = value, f"{loop}'s YAML ({group}.{name})"
        if group == "storage" and not values.get("data_dir"):
            values["data_dir"] = default_data_dir(loop, env, root)
        try:
            resolved[group] = cls(**values)
        except ValidationError as error:
            bad = "; ".join(_describe(e, group, source) for e in error.errors())
            raise SelfImproveError(
                f"Invalid setting in loop `{loop}`: {bad}",
                "set it to a value in the field's range (docs/configuration.md)",
            ) from None
    return resolved


def env_values(cls, group: str, prefix: str, environ: Mapping[str, str]) -> dict:
    """Field -> (raw value, variable) for each field set in the environment: the
    per-group name (`<prefix><GROUP>_<FIELD>`) before the shared one (`<prefix><FIELD>`)."""
    found = {}
    for name in cls.model_fields:
        for variable in field_variables(cls, name, prefix):
            raw = environ.get(variable)
            if raw:
                is_list = getattr(cls.model_fields[name].annotation, "__origin__", None) is list
                found[name] = (raw.split(",") if is_list else raw, variable)
                break
    return found


def deployment_data_dir(environ: Mapping[str, str] | None = None, root: str | None = None) -> str:
    """The deployment's data dir: SELFIMPROVE_DATA_DIR, else the profile's, else ./var. The
    Dagster instance of the local profile lives in it (`dagster_home/`)."""
    env = os.environ if environ is None else environ
    return env.get("SELFIMPROVE_DATA_DIR") or root or "var"


def default_data_dir(loop: str, environ: Mapping[str, str], root: str | None = None) -> str:
    """A loop without a data dir of its own keeps its rounds under the deployment's data
    dir: `<data dir>/loops/<loop>`."""
    return os.path.join(deployment_data_dir(environ, root), "loops", loop)


def _describe(error: Mapping, group: str, source: Mapping[str, str]) -> str:
    field = str(error["loc"][0]) if error.get("loc") else "?"
    where = source.get(field, "")
    if where.isupper():  # an environment variable
        return f"{where}={error.get('input')!r} (sets {group}.{field}: {error['msg']})"
    origin = f" from {where}" if where else ""
    return f"{group}.{field}={error.get('input')!r}{origin} ({error['msg']})"


# --- what a run resolved -----------------------------------------------------------


def settings_values(resources: Mapping[str, dg.ConfigurableResource]) -> dict[str, dict]:
    """group -> field -> value of resolved resources (keyed by group)."""
    return {
        group: resource.model_dump(mode="json")
        for group, resource in sorted(resources.items())
        if hasattr(resource, "model_dump")
    }


def settings_fingerprint(resources: Mapping[str, dg.ConfigurableResource]) -> str:
    """A hash of every resolved setting of a loop: a step's tables are reused by a later
    run only when this is unchanged."""
    text = json.dumps(settings_values(resources), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_changes(
    resources: Mapping[str, dg.ConfigurableResource],
    declared: Mapping[str, dg.ConfigurableResource] | None = None,
) -> list[str]:
    """Readable lines for the settings that differ from the fields' defaults, e.g.
    `task.n_train = 100 (default 200)`; with `declared` (the loop's own settings), a
    value a run changed on top of them (Launchpad, run config) says so."""
    lines = []
    for group, values in settings_values(resources).items():
        defaults = GROUPS[group]().model_dump(mode="json") if group in GROUPS else {}
        loop_values = settings_values(declared or {}).get(group, values)
        for name, value in values.items():
            if value != defaults.get(name):
                line = f"{group}.{name} = {value!r} (default {defaults.get(name)!r})"
                if value != loop_values.get(name):
                    line += f", run config over the loop's {loop_values.get(name)!r}"
                lines.append(line)
            elif value != loop_values.get(name):
                lines.append(f"{group}.{name} = {value!r} (run config over the loop's "
                             f"{loop_values.get(name)!r})")  # fmt: skip
    return lines
