"""The code location loads, and its top-level packages are this repo's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_definitions_load_with_six_round_assets_checks_and_job():
    from selfimprove_dagster.definitions import defs

    job = defs.resolve_job_def("round_job")
    assert job.partitions_def.name == "rounds"
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    steps = {"prompts", "generations", "critiques", "filtered", "checkpoint", "eval_scores"}
    tables = {  # every Parquet table a step writes is an asset of its own
        "prompt_mix", "prompt_candidates", "curriculum_measure", "refinements",
        "checkpoints", "rollouts", "rl_steps", "eval_details",
    }  # fmt: skip
    assert keys - {"promoted_policy", "history"} == steps | tables
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


def _core_modules() -> list[str]:
    """Every module of the core library except the Dagster composition root."""
    import pkgutil

    import selfimprove_dagster

    names = [
        m.name for m in pkgutil.walk_packages(selfimprove_dagster.__path__, "selfimprove_dagster.")
    ]
    return [n for n in names if n != "selfimprove_dagster.definitions"]


def test_core_import_loads_neither_torch_nor_dagster():
    modules = ", ".join(_core_modules())
    code = (
        f"import sys, {modules};"
        "print(sorted(m for m in ('torch', 'dagster', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _imports_of(path: Path, package: str) -> set[str]:
    """Project modules `path` imports at module level (not inside functions)."""
    import ast

    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}")
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in {package, "assets", "resources"}}


def test_core_imports_go_down_only_and_have_no_cycles():
    """The core never imports the Dagster layers (assets, resources), and its module-level
    imports form no cycle (a stage package never needs a module that needs it back)."""
    core = set(_core_modules())
    graph: dict[str, set[str]] = {}
    for name in core:
        path = REPO / (name.replace(".", "/") + ".py")
        if not path.is_file():
            path = REPO / name.replace(".", "/") / "__init__.py"
        imported = _imports_of(path, "selfimprove_dagster")
        upward = {i for i in imported if i.split(".")[0] in {"assets", "resources"}}
        assert not upward, f"{name} imports the Dagster layers: {upward}"
        graph[name] = {i for i in imported if i in core and i != name}

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        assert node not in stack, f"import cycle: {' -> '.join([*stack, node])}"
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, [*stack, node], done)
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [], done)


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
