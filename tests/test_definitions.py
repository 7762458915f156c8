"""The code location loads, and its top-level packages are this repo's."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_definitions_load_with_six_round_assets_checks_and_job():
    from selfimprove_dagster.definitions import defs

    job = defs.resolve_job_def("round_job")
    assert job.partitions_def.name == "rounds"
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"prompts", "generations", "critiques", "filtered", "checkpoint", "eval_scores"}
    assert {k.name for k in graph.asset_check_keys} >= {
        "check_min_rows_filtered",
        "check_unique_generation_id_filtered",
        "check_training_ran_checkpoint",
    }


def test_generic_package_names_resolve_to_this_repo():
    import assets
    import resources

    assert assets.__file__.startswith(str(REPO / "assets"))
    assert resources.__file__.startswith(str(REPO / "resources"))


def test_core_import_loads_neither_torch_nor_dagster():
    code = (
        "import sys, selfimprove_dagster, selfimprove_dagster.star, selfimprove_dagster.storage;"
        "print(sorted(m for m in ('torch', 'dagster', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_env_overrides_reach_resources(monkeypatch):
    from resources import TaskResource, from_env

    monkeypatch.setenv("SELFIMPROVE_N_TRAIN", "17")
    monkeypatch.setenv("SELFIMPROVE_TASK", "word_problems")
    task = from_env(TaskResource)
    assert (task.n_train, task.task, task.n_eval) == (17, "word_problems", 200)


def test_env_override_of_the_wrong_type_names_the_variable(monkeypatch):
    import pytest

    from resources import TaskResource, from_env
    from selfimprove_dagster.errors import SelfImproveError

    monkeypatch.setenv("SELFIMPROVE_N_TRAIN", "many")
    with pytest.raises(SelfImproveError, match="SELFIMPROVE_N_TRAIN='many'"):
        from_env(TaskResource)


def test_env_override_of_a_list_field(monkeypatch):
    from resources import EvolutionResource, from_env

    monkeypatch.setenv("SELFIMPROVE_TEMPERATURE_GRID", "0.5,0.7")
    assert from_env(EvolutionResource).temperature_grid == [0.5, 0.7]
