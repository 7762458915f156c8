"""Profiles: where the same round graph runs, picked by one environment variable.

    SELFIMPROVE_PROFILE=local     in-process executor, transformers engine on CPU (default)
    SELFIMPROVE_PROFILE=gpu       in-process executor, vLLM engine, LoRA training on CUDA
    SELFIMPROVE_PROFILE=cluster   dagster-k8s k8s_job_executor (a pod per step, a GPU for
                                  training), generation through the `openai` engine against
                                  a vLLM server fleet; Postgres instance storage
                                  (deploy/dagster.yaml)

A profile only changes defaults: each resource field it sets can still be overridden by
its own `SELFIMPROVE_<FIELD>` variable. Plain data here (no Dagster import); the
Dagster composition root (`definitions.py`) turns `executor` into an executor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from selfimprove_dagster.errors import SelfImproveError

PROFILE_ENV = "SELFIMPROVE_PROFILE"
ENV_PREFIX = "SELFIMPROVE_"

# Kubernetes resources of a step pod (dagster-k8s `container_config` / `pod_spec_config`).
# Steps that only call the vLLM fleet or read Parquet need CPU; training needs a GPU.
CPU_STEP = {"container_config": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"}}}}
GPU_STEP = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "4", "memory": "24Gi"},
            "limits": {"nvidia.com/gpu": "1"},
        }
    },
    # Only schedule on GPU nodes, and tolerate their usual taint.
    "pod_spec_config": {
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}
# Per asset (= op) name: the asset steps that need a GPU under the cluster profile.
# Generation and evaluation call the vLLM fleet through the openai engine, so only
# training holds a GPU in a step pod.
CLUSTER_GPU_ASSETS = ("checkpoint",)


# The concurrency pool of every step that loads a model (generation, training,
# evaluation): `pool=MODEL_POOL` on those assets, limit 1 in the instance, so two
# engines never share one GPU (or two CPU cores) even across runs.
MODEL_POOL = "model"

# $DAGSTER_HOME/dagster.yaml of the local profile, written by `selfimprove` into the data
# dir's dagster_home (tests/test_orphans.py validates it against Dagster's schema).
LOCAL_INSTANCE_YAML = f"""\
# Written by `selfimprove` (selfimprove_dagster/profiles.py, LOCAL_INSTANCE_YAML); it is
# rewritten while this first line is unchanged. Delete that line to keep your own edits.
telemetry:
  enabled: false

# Runs whose process died: the daemon fails runs stuck starting or canceling and frees
# their pool slots; `selfimprove` (run, status, ui) marks STARTED runs whose process is
# gone as failed, with the reason, before it does anything else.
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  poll_interval_seconds: 60
  free_slots_after_run_end_seconds: 30

concurrency:
  pools:
    default_limit: 1  # pool `{MODEL_POOL}`: one model-loading step at a time
  runs:
    max_concurrent_runs: 2  # a round and the promoted_policy/history refresh
    tag_concurrency_limits:
      # A second run of a round that is already running waits in the queue.
      - key: dagster/partition
        value: {{applyLimitPerUniqueValue: true}}
        limit: 1
      # A backfill over several rounds runs them one at a time, in round order.
      - key: dagster/backfill
        value: {{applyLimitPerUniqueValue: true}}
        limit: 1

# Declarative Automation: the default automation sensor materializes promoted_policy
# and history when a round's eval_scores lands with its blocking checks passed.
auto_materialize:
  enabled: true
  use_sensors: true
"""
MANAGED_MARKER = LOCAL_INSTANCE_YAML.splitlines()[0]


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    executor: str  # "in_process" or "k8s"
    # Resource key -> field -> default (overridable by SELFIMPROVE_<FIELD>).
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # k8s executor config (dagster-k8s `k8s_job_executor`), cluster profile only.
    k8s_executor_config: Mapping[str, Any] = field(default_factory=dict)
    # Where the Dagster instance stores runs and events (documentation; the instance is
    # configured by $DAGSTER_HOME/dagster.yaml, not by Definitions).
    instance_storage: str = "sqlite"

    def resource_defaults(
        self, resource: str, environ: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """This profile's defaults for `resource`, minus fields set in the environment
        (`SELFIMPROVE_<FIELD>` and `SELFIMPROVE_<RESOURCE>_<FIELD>` always win)."""
        env = os.environ if environ is None else environ
        return {
            name: value
            for name, value in self.defaults.get(resource, {}).items()
            if not env.get(ENV_PREFIX + name.upper())
            and not env.get(f"{ENV_PREFIX}{resource.upper()}_{name.upper()}")
        }

    def executor_config_for(self, loops: list[str]) -> dict[str, Any]:
        """The k8s executor's config for a code location of `loops`: each per-step entry
        (keyed by a round step, e.g. `checkpoint`) for every loop's op of that step
        (`<loop>_checkpoint`)."""
        config = dict(self.k8s_executor_config)
        per_step = config.pop("per_step_k8s_config", {})
        if per_step:
            config["per_step_k8s_config"] = {
                f"{loop}_{step}": value for loop in loops for step, value in per_step.items()
            }
        return config

    def k8s_op_tags(self, asset_name: str) -> dict[str, Any]:
        """Op tags requesting this asset's pod resources (for `@dg.asset(op_tags=...)`)."""
        if self.executor != "k8s":
            return {}
        return {"dagster-k8s/config": GPU_STEP if asset_name in CLUSTER_GPU_ASSETS else CPU_STEP}


LOCAL = Profile(
    name="local",
    description="one machine, CPU: in-process executor, transformers engine",
    executor="in_process",
)

GPU = Profile(
    name="gpu",
    description="one GPU machine: in-process executor, vLLM engine (LoRA adapters served "
    "with LoRARequest), LoRA training on CUDA",
    executor="in_process",
    defaults={
        # With SELFIMPROVE_POOL=ray each Ray worker's vLLM engine holds one GPU.
        "generator": {"engine": "vllm", "batch_size": 256, "ray_gpus_per_worker": 1},
        # grpo/rloo rounds generate their rollouts with TRL's vLLM (colocate) on the GPU.
        "trainer": {"device": "cuda", "rl_use_vllm": True},
    },
)

CLUSTER = Profile(
    name="cluster",
    description="Kubernetes: k8s_job_executor (a pod per step, GPU for training), "
    "generation through the openai engine against a vLLM server fleet, Postgres storage",
    executor="k8s",
    defaults={
        # The fleet serves the base model and loads each round's adapter by name, which
        # needs every adapter trained on the base model (ReST-EM's restart).
        "generator": {
            "engine": "openai",
            "openai_base_url": "http://vllm.selfimprove.svc.cluster.local:8000/v1",
            "openai_load_adapters": True,
            "openai_max_concurrency": 32,
        },
        "trainer": {"init": "restart", "device": "cuda"},
        "storage": {"data_dir": "/data"},  # a ReadWriteMany volume shared by all pods
    },
    k8s_executor_config={
        "max_concurrent": 4,
        # SELFIMPROVE_* settings and the fleet's API key reach every step pod.
        "env_config_maps": ["selfimprove-config"],
        "env_secrets": ["selfimprove-secrets"],
        "volumes": [
            {
                "name": "selfimprove-data",
                "persistent_volume_claim": {"claim_name": "selfimprove-data"},
            }
        ],
        "volume_mounts": [{"name": "selfimprove-data", "mount_path": "/data"}],
        "step_k8s_config": CPU_STEP,
        # Per asset step: the GPU request (the same config `k8s_op_tags` gives as op tags).
        "per_step_k8s_config": {name: GPU_STEP for name in CLUSTER_GPU_ASSETS},
    },
    instance_storage="postgres",
)

PROFILES = {p.name: p for p in (LOCAL, GPU, CLUSTER)}


def active_profile(environ: Mapping[str, str] | None = None) -> Profile:
    """The profile named by SELFIMPROVE_PROFILE (default: local)."""
    env = os.environ if environ is None else environ
    name = (env.get(PROFILE_ENV) or "local").strip().lower()
    if name not in PROFILES:
        raise SelfImproveError(
            f"Unknown profile {PROFILE_ENV}={name!r}",
            f"use one of: {', '.join(PROFILES)}",
        )
    return PROFILES[name]
