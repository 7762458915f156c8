"""Profiles picked by SELFIMPROVE_PROFILE: local / gpu / cluster definitions load, the
cluster one with dagster-k8s's k8s_job_executor configured (per-asset GPU request) and
the deploy/dagster.yaml instance (Postgres storage, K8sRunLauncher) valid."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.profiles import CLUSTER, GPU, LOCAL, active_profile
from tests.conftest import REPO

DEPLOY = REPO / "deploy"


def _clean_env(monkeypatch, **env):
    for name in list(os.environ):
        if name.startswith("SELFIMPROVE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_one_variable_picks_the_profile():
    assert active_profile({}) is LOCAL
    assert active_profile({"SELFIMPROVE_PROFILE": "GPU"}) is GPU
    assert active_profile({"SELFIMPROVE_PROFILE": "cluster"}) is CLUSTER
    with pytest.raises(SelfImproveError, match="Unknown profile.*local, gpu, cluster"):
        active_profile({"SELFIMPROVE_PROFILE": "laptop"})


def test_a_field_set_in_the_environment_beats_the_profile_default():
    assert GPU.resource_defaults("generator", {})["engine"] == "vllm"
    overridden = GPU.resource_defaults("generator", {"SELFIMPROVE_ENGINE": "transformers"})
    assert "engine" not in overridden
    assert LOCAL.resource_defaults("generator", {}) == {}


def test_local_profile_is_in_process_with_the_transformers_engine(monkeypatch):
    _clean_env(monkeypatch)
    from selfimprove_dagster.definitions import build_definitions

    defs = build_definitions()
    assert defs.resolve_job_def("demo_round_job").executor_def.name == "in_process"
    assert defs.resources["demo_generator"].engine == "transformers"
    assert defs.resources["demo_trainer"].device == "cpu"


def test_gpu_profile_uses_vllm_and_cuda_training(monkeypatch):
    _clean_env(monkeypatch, SELFIMPROVE_PROFILE="gpu")
    from selfimprove_dagster.definitions import build_definitions

    defs = build_definitions()
    assert defs.resolve_job_def("demo_round_job").executor_def.name == "in_process"
    for loop in ("demo", "add2_grpo"):  # the profile is the deployment's: every loop's
        assert defs.resources[f"{loop}_generator"].engine == "vllm"
        assert defs.resources[f"{loop}_trainer"].device == "cuda"
    monkeypatch.setenv("SELFIMPROVE_ENGINE", "openai")  # the demo loop reads SELFIMPROVE_*
    resources = build_definitions().resources
    assert resources["demo_generator"].engine == "openai"
    assert resources["add2_grpo_generator"].engine == "vllm"


def test_cluster_profile_loads_with_the_k8s_executor(monkeypatch):
    _clean_env(monkeypatch, SELFIMPROVE_PROFILE="cluster")
    from selfimprove_dagster.definitions import build_definitions

    defs = build_definitions()
    job = defs.resolve_job_def("demo_round_job")
    assert job.executor_def.name == "k8s"
    # The executor's config (volumes, env, per-step resources) passes dagster-k8s's schema.
    assert dg.validate_run_config(job, {}) is not None
    executor_config = CLUSTER.k8s_executor_config
    gpu_steps = CLUSTER.executor_config_for(["demo", "add2_grpo"])["per_step_k8s_config"]
    assert set(gpu_steps) == {"demo_checkpoint", "add2_grpo_checkpoint"}
    node_names = {node.name for node in job.graph.nodes}
    assert "demo_checkpoint" in node_names  # keys are real op names of the round jobs
    limits = gpu_steps["demo_checkpoint"]["container_config"]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": "1"}
    tags = CLUSTER.k8s_op_tags("checkpoint")["dagster-k8s/config"]
    assert tags == gpu_steps["demo_checkpoint"]
    # Dagster passes these dicts through as is; the Kubernetes models check their keys.
    for step in (executor_config["step_k8s_config"], *gpu_steps.values()):
        _as_kubernetes_objects(step)
    assert "nvidia.com/gpu" not in str(CLUSTER.k8s_op_tags("generations"))
    generator, trainer = defs.resources["demo_generator"], defs.resources["demo_trainer"]
    assert (generator.engine, generator.openai_load_adapters) == ("openai", True)
    assert (trainer.init, trainer.device) == ("restart", "cuda")
    # The profile's data dir is the deployment's: each loop keeps its rounds below it.
    assert defs.resources["add2_grpo_storage"].data_dir == "/data/loops/add2_grpo"


def test_cluster_profile_passes_dagster_definitions_validate(monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIMPROVE_")}
    env["SELFIMPROVE_PROFILE"] = "cluster"
    dagster = [sys.executable, "-m", "dagster", "definitions", "validate"]
    out = subprocess.run(
        [*dagster, "-m", "selfimprove_dagster.definitions"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful" in out.stdout + out.stderr


def test_instance_yaml_has_postgres_storage_and_a_valid_k8s_run_launcher(monkeypatch):
    from dagster._config import process_config, resolve_to_config_type
    from dagster._core.instance.config import dagster_instance_config
    from dagster_k8s import K8sRunLauncher
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_DB", "DAGSTER_PG_USERNAME"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "x")
    monkeypatch.setenv("SELFIMPROVE_IMAGE", "registry.example/selfimprove:1")
    config, _ = dagster_instance_config(str(DEPLOY), "dagster.yaml")  # validates the schema
    assert set(config["storage"]) == {"postgres"}
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    checked = process_config(
        resolve_to_config_type(K8sRunLauncher.config_type()), launcher["config"]
    )
    assert checked.success, checked.errors
    postgres = {"postgres_db": config["storage"]["postgres"]["postgres_db"]}
    for storage in (PostgresRunStorage, PostgresEventLogStorage):
        result = process_config(resolve_to_config_type(storage.config_type()), postgres)
        assert result.success, result.errors


def _as_kubernetes_objects(step: dict) -> None:
    """Build the pod's container and spec from a dagster-k8s step config (raises on an
    unknown key, e.g. `resourcez`)."""
    import kubernetes
    from dagster_k8s.models import k8s_model_from_dict

    container = {"name": "step", **step.get("container_config", {})}
    k8s_model_from_dict(kubernetes.client.V1Container, container)
    spec = {"containers": [container], **step.get("pod_spec_config", {})}
    k8s_model_from_dict(kubernetes.client.V1PodSpec, spec)
