"""The code location loads, and its top-level packages are this repo's."""

from __future__ import annotations

import subprocess
import sys

import dagster as dg

from tests.conftest import REPO


def test_definitions_load_two_loops_each_with_six_steps_checks_and_job():
    from selfimprove_dagster.definitions import build_definitions

    defs = build_definitions()
    for loop in ("demo", "add2_grpo"):
        job = defs.resolve_job_def(f"{loop}_round_job")
        assert job.partitions_def.name == f"{loop}_rounds"
    graph = defs.resolve_asset_graph()
    keys = {k.path[-1] for k in graph.get_all_asset_keys() if k.path[0] == "demo"}
    steps = {"prompts", "generations", "critiques", "filtered", "checkpoint", "eval_scores"}
    tables = {  # every Parquet table a step writes is an asset of its own
        "prompt_mix", "prompt_candidates", "curriculum_measure", "refinements",
        "checkpoints", "rollouts", "rl_steps", "eval_details",
    }  # fmt: skip
    assert keys - {"promoted_policy", "history"} == steps | tables
    assert dg.AssetKey("experiments") in graph.get_all_asset_keys()
    assert {k.name for k in graph.asset_check_keys} >= {
        "check_min_rows_filtered",
        "check_unique_generation_id_filtered",
        "check_training_ran_checkpoint",
    }


def test_the_dagster_layers_resolve_to_this_repo_under_the_package():
    """Imported as selfimprove_dagster.assets / .resources (never by the generic top-level
    names, which a user's own packages may hold): the repo's folders in a checkout."""
    from selfimprove_dagster import assets, resources

    assert assets.__file__.startswith(str(REPO / "assets"))
    assert resources.__file__.startswith(str(REPO / "resources"))


def test_no_code_imports_the_generic_top_level_names():
    import re

    generic = re.compile(r"^\s*(from|import) (assets|resources)\b", re.M)
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("selfimprove_dagster", "assets", "resources", "tests", "benchmarks")
        for path in (REPO / folder).rglob("*.py")
        if generic.search(path.read_text()) and path.name != "test_install.py"
    ]  # test_install.py writes a user's project, whose own `assets` package it imports
    assert offenders == []


CORE_TOP = {
    p.stem for p in (REPO / "selfimprove_dagster").iterdir() if p.suffix == ".py" or p.is_dir()
}


def _core_modules() -> list[str]:
    """Every module of the core library except the Dagster composition root."""
    import pkgutil

    import selfimprove_dagster

    names = [
        m.name for m in pkgutil.walk_packages(selfimprove_dagster.__path__, "selfimprove_dagster.")
    ]
    # Entry points and the Dagster layers (found through the package's search path).
    above_the_core = ("definitions", "cli", "components", "defs", "assets", "resources")
    return [
        n for n in names if n.split(".")[1] in CORE_TOP and n.split(".")[1] not in above_the_core
    ]


def test_core_import_loads_neither_torch_nor_dagster():
    modules = ", ".join(_core_modules())
    code = (
        f"import sys, {modules};"
        "print(sorted(m for m in ('torch', 'dagster', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_env_overrides_reach_the_default_loop_only(monkeypatch):
    """SELFIMPROVE_* variables keep working for the demo loop (env_prefix); the other
    loop's settings are its own."""
    from selfimprove_dagster.definitions import build_definitions

    monkeypatch.setenv("SELFIMPROVE_N_TRAIN", "17")
    monkeypatch.setenv("SELFIMPROVE_TASK", "word_problems")
    resources = build_definitions().resources
    demo, other = resources["demo_task"], resources["add2_grpo_task"]
    assert (demo.n_train, demo.task, demo.n_eval) == (17, "word_problems", 200)
    assert (other.n_train, other.task) == (200, "addition_2digit")


def test_env_override_of_the_wrong_type_names_the_variable_and_the_loop(monkeypatch):
    import pytest

    from selfimprove_dagster.errors import SelfImproveError
    from selfimprove_dagster.resources.settings import resolve_settings

    environ = {"SELFIMPROVE_N_TRAIN": "many"}
    expected = "loop `demo`: SELFIMPROVE_N_TRAIN='many' \\(sets task.n_train"
    with pytest.raises(SelfImproveError, match=expected):
        resolve_settings("demo", {}, "SELFIMPROVE_", environ)


def test_env_override_of_a_list_field():
    from selfimprove_dagster.resources.settings import resolve_settings

    environ = {"SELFIMPROVE_TEMPERATURE_GRID": "0.5,0.7"}
    evolution = resolve_settings("demo", {}, "SELFIMPROVE_", environ)["evolution"]
    assert evolution.temperature_grid == [0.5, 0.7]


def test_yaml_beats_the_environment_and_the_environment_beats_the_profile():
    from selfimprove_dagster.resources.settings import resolve_settings

    environ = {"SELFIMPROVE_N_TRAIN": "17", "SELFIMPROVE_ENGINE": "openai"}
    profile = {"generator": {"engine": "vllm", "batch_size": 256}}
    resolved = resolve_settings("demo", {"task": {"n_train": 9}}, "SELFIMPROVE_", environ, profile)
    assert resolved["task"].n_train == 9  # YAML
    assert resolved["generator"].engine == "openai"  # environment over the profile
    assert resolved["generator"].batch_size == 256  # the profile over the default
    assert resolved["storage"].data_dir == "var/loops/demo"  # no data dir of its own
