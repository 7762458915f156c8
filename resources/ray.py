"""Connecting a step to a Ray cluster, through dagster-ray's resource.

The generator resource (`pool=ray`) calls `connect(address)` before it starts a
`RayEnginePool`. The connection is made by dagster-ray's `LocalRay` (its `connect()`:
`ray.init` with the resource's runtime env and Ray Data options), pointed at:

    ray_address=""                    RAY_ADDRESS if set, else a Ray started in this process
    ray_address="10.0.0.5:6379"       an existing cluster, from a process on one of its nodes
    ray_address="ray://head:10001"    an existing cluster through Ray Client (KubeRay's
                                      head service exposes port 10001)

One process holds one Ray connection (Ray's own rule), and it stays for the process:
the engine pool keeps its workers across the steps of an in-process run and stops them
before training (`release_engine`). dagster-ray's per-step lifecycle would disconnect
(and so kill the workers) after every step.

An address nothing answers on fails at once, in one line naming it and the fix, before
`ray.init` (which would otherwise retry for minutes). `ray` and `dagster_ray` are
imported inside functions: without the `[ray]` extra the error names it.
"""

from __future__ import annotations

import contextlib
import os
import socket

from selfimprove_dagster.engines.ray_pool import RAY_EXTRA_FIX
from selfimprove_dagster.errors import SelfImproveError


def connect(address: str = "", timeout_s: float = 10.0) -> str:
    """Connect this process to the Ray cluster at `address` ("" = RAY_ADDRESS, else a
    local Ray), unless it is connected already; returns the cluster's address."""
    try:
        import ray
        from dagster_ray import LocalRay
        from dagster_ray.configs import RayDataExecutionOptions
    except ImportError:
        raise SelfImproveError(
            "The Ray pool (SELFIMPROVE_POOL=ray) needs ray and dagster-ray, which are not "
            "installed here",
            RAY_EXTRA_FIX,
        ) from None
    target = address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if not target or target == "auto" or same_address(target, current):
            return current
    if target and target not in ("auto", "local"):
        probe(target, timeout_s)
    if ray.is_initialized():
        raise SelfImproveError(
            f"This process is connected to the Ray cluster at {current}, not {target}",
            "one Ray cluster per process: point SELFIMPROVE_RAY_ADDRESS at the same cluster "
            "for every loop in it, or run the other loop in a process of its own",
        )

    class AddressRay(LocalRay):
        """dagster-ray's LocalRay, connecting to `target` (None: RAY_ADDRESS or a new Ray)."""

        @property
        def ray_address(self) -> str | None:  # type: ignore[override]
            return target or None

    class DriverDataOptions(RayDataExecutionOptions):
        """Ray Data options set in this process only. dagster-ray also applies them on a
        worker through a 1-CPU task, which waits forever on a cluster whose CPUs the
        engine workers hold (another step's pool); the engine workers use no Ray Data."""

        def apply_remote(self) -> None:
            return None

    from dagster import build_init_resource_context

    resource = AddressRay(data_execution_options=DriverDataOptions())
    resource.connect(build_init_resource_context())
    return ray.get_runtime_context().gcs_address


def probe(address: str, timeout_s: float) -> None:
    """Fail in one line unless something accepts TCP connections at `address`."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise SelfImproveError(
            f"Cannot reach the Ray cluster at {address} ({reason})",
            "start it (`ray start --head`, or the KubeRay RayCluster) or fix "
            "SELFIMPROVE_RAY_ADDRESS / RAY_ADDRESS; unset both to start a Ray in this "
            "process, or use SELFIMPROVE_POOL=local",
        ) from None


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "ray://host:port" (Ray Client's default 10001)."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host:
        return rest, 10001 if address.startswith("ray://") else 6379
    return host.strip("[]"), int(port)


def same_address(a: str, b: str) -> bool:
    """Whether two addresses name one cluster (loopback and this host's name agree)."""
    (host_a, port_a), (host_b, port_b) = split_address(a), split_address(b)
    return port_a == port_b and _local_or(host_a) == _local_or(host_b)


def _local_or(host: str) -> str:
    local = {"localhost", "::1", socket.gethostname()}
    with contextlib.suppress(OSError):  # what Ray resolves loopback to (the node's IP)
        local.add(socket.gethostbyname(socket.gethostname()))
    return "local" if host in local or host.startswith("127.") else host
