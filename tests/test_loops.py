"""Loops as components: `build_loop(spec)` names everything by the loop, two loops in one
instance are independent, and `SelfImproveLoop` in YAML (scaffold -> edit -> load) refuses
an unknown key with the closest valid name and renders `{{ env(...) }}`."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml
from dagster.components.testing import create_defs_folder_sandbox

from selfimprove_dagster.assets import Loop, LoopSpec, build_loop
from selfimprove_dagster.components import SelfImproveLoop
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.resources import MethodResource, StorageResource
from selfimprove_dagster.resources.settings import GROUPS


def spec(name: str, data_dir, **groups) -> LoopSpec:
    resources = {group: groups.get(group) or cls() for group, cls in GROUPS.items()}
    resources["storage"] = StorageResource(data_dir=str(data_dir))
    return LoopSpec(name, resources)


def messages(error: BaseException) -> str:
    """The error and every error it was raised from (a component's wraps its cause)."""
    found = []
    while error is not None:
        found.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(found)


def test_every_name_of_a_loop_carries_the_loop(tmp_path):
    defs = build_loop(spec("add2_star", tmp_path))
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert "add2_star/generations" in keys and all(k.startswith("add2_star/") for k in keys)
    assert {job.name for job in repo.get_all_jobs()} >= {
        "add2_star_round_job",
        "add2_star_policy_job",
    }
    assert {s.name for s in repo.sensor_defs} == {
        "add2_star_next_round_sensor",
        "add2_star_round_failure_sensor",
        "add2_star_policy_automation_sensor",
    }
    assert [s.name for s in repo.schedule_defs] == ["add2_star_round_schedule"]
    assert set(defs.resources) == {f"add2_star_{group}" for group in GROUPS}
    job = defs.resolve_job_def("add2_star_round_job")
    assert job.partitions_def.name == "add2_star_rounds"


def test_two_loops_in_one_code_location_and_instance_are_independent(tmp_path):
    star = build_loop(spec("a_star", tmp_path / "a"))
    grpo = build_loop(spec("a_grpo", tmp_path / "b", method=MethodResource(method="grpo")))
    both = dg.Definitions.merge(star, grpo)  # no clash of asset, resource or job names
    assert both.resources["a_grpo_method"].method == "grpo"
    assert both.resources["a_star_method"].method == "star"
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(Loop("a_star").partitions.name, ["round_000"])
        assert instance.get_dynamic_partitions("a_star_rounds") == ["round_000"]
        assert instance.get_dynamic_partitions("a_grpo_rounds") == []


@pytest.mark.parametrize("name", ["Demo", "1loop", "my-loop", ""])
def test_a_loop_name_that_cannot_name_dagster_objects_is_refused(name, tmp_path):
    with pytest.raises(SelfImproveError, match="cannot name Dagster objects"):
        spec(name, tmp_path)


def test_scaffold_writes_a_loop_that_loads_as_written():
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(SelfImproveLoop, defs_path="my_loop")
        written = yaml.safe_load((path / "defs.yaml").read_text())
        assert written["type"] == "selfimprove_dagster.components.SelfImproveLoop"
        assert written["attributes"]["name"] == "my_loop"
        with sandbox.load_component_and_build_defs(defs_path=path) as (component, defs):
            assert isinstance(component, SelfImproveLoop)
            assert defs.resolve_job_def("my_loop_round_job") is not None


def test_an_unknown_key_is_refused_with_the_closest_valid_name():
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(
            SelfImproveLoop,
            defs_path="typo",
            defs_yaml_contents={
                "type": "selfimprove_dagster.components.SelfImproveLoop",
                "attributes": {"name": "typo", "task": {"n_trian": 10}},
            },
        )
        loading = sandbox.load_component_and_build_defs(defs_path=path)
        with pytest.raises(Exception) as error, loading:  # noqa: B017
            pass
        assert "unknown setting `n_trian` in group `task`; did you mean `n_train`?" in (
            messages(error.value)
        )


def test_env_templating_and_ranges_in_yaml(monkeypatch):
    monkeypatch.setenv("MY_N_TRAIN", "12")
    with create_defs_folder_sandbox() as sandbox:
        attributes = {"name": "templated", "task": {"n_train": "{{ env('MY_N_TRAIN', '5') }}"}}
        path = sandbox.scaffold_component(
            SelfImproveLoop,
            defs_path="templated",
            defs_yaml_contents={"type": "selfimprove_dagster.components.SelfImproveLoop",
                                "attributes": attributes},
        )  # fmt: skip
        with sandbox.load_component_and_build_defs(defs_path=path) as (_, defs):
            assert defs.resources["templated_task"].n_train == 12
        monkeypatch.setenv("MY_N_TRAIN", "0")  # out of range: the field's own check
        loading = sandbox.load_component_and_build_defs(defs_path=path)
        with pytest.raises(Exception) as error, loading:  # noqa: B017
            pass
        assert "Invalid setting in loop `templated`: task.n_train=0 from" in messages(error.value)


def test_the_add_round_job_adds_the_next_partition_from_the_launchpad(tmp_path):
    defs = build_loop(spec("l", tmp_path))
    job = defs.resolve_job_def("l_add_round_job")
    with dg.instance_for_test() as instance:
        assert job.execute_in_process(instance=instance).success
        named = {"ops": {"l_add_round": {"config": {"round": "round_005"}}}}
        assert job.execute_in_process(instance=instance, run_config=named).success
        assert job.execute_in_process(instance=instance).success
        assert instance.get_dynamic_partitions("l_rounds") == [
            "round_000",
            "round_005",
            "round_006",
        ]
        bad = {"ops": {"l_add_round": {"config": {"round": "r7"}}}}
        result = job.execute_in_process(instance=instance, run_config=bad, raise_on_error=False)
        assert not result.success
