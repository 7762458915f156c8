"""Settings hygiene (issue 12.7): shared variables are listed and can be split per
resource, values are range-checked with one line naming the variable, and a misspelled
`SELFIMPROVE_*` name is an error naming the closest valid one."""

from __future__ import annotations

import dagster as dg
import pytest
from pydantic import Field

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.profiles import CLUSTER
from selfimprove_dagster.resources import (
    EvolutionResource,
    GeneratorResource,
    TaskResource,
    TrainerResource,
)
from selfimprove_dagster.resources.env import check_environment, known_variables, shared_variables
from selfimprove_dagster.resources.settings import GROUPS, resolve_settings


def from_env(cls, environ):
    """The demo loop's resource of class `cls` with only `environ` set (SELFIMPROVE_*)."""
    group = next(g for g, c in GROUPS.items() if c is cls)
    return resolve_settings("demo", {}, "SELFIMPROVE_", environ)[group]


def test_shared_variables_name_every_field_they_set():
    shared = shared_variables()
    assert {"GeneratorResource.seed", "TaskResource.seed", "TrainerResource.seed"} <= set(
        shared["SELFIMPROVE_SEED"]
    )
    assert {"GeneratorResource.batch_size", "TrainerResource.batch_size"} <= set(
        shared["SELFIMPROVE_BATCH_SIZE"]
    )
    assert {"EvolutionResource.regression_tolerance", "GatesResource.regression_tolerance"} <= set(
        shared["SELFIMPROVE_REGRESSION_TOLERANCE"]
    )
    assert "SELFIMPROVE_N_EVAL" not in shared  # one field, one variable


def test_the_per_resource_variable_beats_the_shared_one():
    env = {"SELFIMPROVE_SEED": "5", "SELFIMPROVE_TRAINER_SEED": "7"}
    assert from_env(TrainerResource, env).seed == 7
    assert from_env(GeneratorResource, env).seed == 5
    assert from_env(TaskResource, env).seed == 5
    assert from_env(EvolutionResource, {"SELFIMPROVE_EVOLUTION_MAX_ROUNDS": "9"}).max_rounds == 9


@pytest.mark.parametrize(
    ("cls", "variable", "value"),
    [
        (GeneratorResource, "SELFIMPROVE_TEMPERATURE", "-0.5"),
        (GeneratorResource, "SELFIMPROVE_TOP_P", "7"),
        (GeneratorResource, "SELFIMPROVE_GENERATOR_TOP_P", "0"),
        (TaskResource, "SELFIMPROVE_N_EVAL", "0"),
        (GeneratorResource, "SELFIMPROVE_BATCH_SIZE", "0"),
    ],
)
def test_out_of_range_values_are_one_error_naming_the_variable(cls, variable, value):
    with pytest.raises(SelfImproveError) as error:
        from_env(cls, {variable: value})
    message = str(error.value)
    assert f"{variable}={value!r}" in message
    assert "\n" not in message


def test_a_misspelled_variable_names_the_closest_valid_one():
    with pytest.raises(SelfImproveError) as error:
        check_environment({"SELFIMPROVE_N_EVL": "3", "SELFIMPROVE_N_TRAIN": "10"})
    assert str(error.value).startswith(
        "Unknown setting SELFIMPROVE_N_EVL (did you mean SELFIMPROVE_N_EVAL?)"
    )
    with pytest.raises(SelfImproveError, match="SELFIMPROVE_TRAINR_SEED \\(did you mean "):
        check_environment({"SELFIMPROVE_TRAINR_SEED": "1"})


def test_valid_names_pass_the_check():
    check_environment(
        {
            "SELFIMPROVE_N_TRAIN": "10",
            "SELFIMPROVE_TRAINER_SEED": "1",
            "SELFIMPROVE_PROFILE": "local",
            "SELFIMPROVE_OPENAI_API_KEY": "x",
            "SELFIMPROVE_DATA_DIR": "var",
            "OTHER": "ignored",
        }
    )


def test_known_names_come_from_the_resource_classes():
    class ShinyResource(dg.ConfigurableResource):
        """A resource another module adds later."""

        sparkle: int = Field(default=1, description="How much.")

    assert "SELFIMPROVE_SPARKLE" in known_variables([ShinyResource])
    assert "SELFIMPROVE_SHINY_SPARKLE" in known_variables([ShinyResource])
    check_environment({"SELFIMPROVE_SPARKLE": "2"}, classes=[ShinyResource])
    assert "SELFIMPROVE_N_EVAL" in known_variables()  # the real resources, read now


def test_a_profile_default_gives_way_to_the_per_resource_variable():
    env = {"SELFIMPROVE_GENERATOR_ENGINE": "vllm"}
    assert "engine" not in CLUSTER.resource_defaults("generator", env)
    assert "engine" in CLUSTER.resource_defaults("generator", {})


def test_definitions_refuse_a_misspelled_variable(monkeypatch):
    from selfimprove_dagster.definitions import build_definitions

    monkeypatch.setenv("SELFIMPROVE_TEMPERATUR", "0.5")
    with pytest.raises(SelfImproveError, match="did you mean SELFIMPROVE_TEMPERATURE"):
        build_definitions()
