"""Ray cluster checks before `up` starts an engine on vLLM's Ray executor: reachable, and enough GPUs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable

from serve.config.model_file import ModelFile

RAY_ADDRESS_ENV = "RAY_ADDRESS"
INSTALL_HINT = "Ray is not installed here: pip install -e '.[cpu,ray]' (or gpu,ray)"
# ray.init retries an unreachable address for about a minute; that is long enough to tell.
CONNECT_TIMEOUT = 90.0

ClusterResources = Callable[[str], dict[str, float]]


class RayClusterError(Exception):
    """The Ray cluster a model file needs is not there, or too small."""


def ray_address(model: ModelFile) -> str | None:
    """The cluster a model file uses: its ray.address, else RAY_ADDRESS; None means none is given."""
    if model.ray is not None and model.ray.address:
        return model.ray.address
    return os.environ.get(RAY_ADDRESS_ENV) or None


def cluster_resources(address: str) -> dict[str, float]:
    """Total resources of the cluster at `address`, asked from a separate process (Ray stays out of `up`)."""
    if importlib.util.find_spec("ray") is None:
        raise RayClusterError(INSTALL_HINT)
    code = (
        "import json, ray\n"
        f"ray.init(address={address!r}, log_to_driver=False, logging_level='ERROR')\n"
        "print(json.dumps(ray.cluster_resources()))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=CONNECT_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise RayClusterError(f"no answer from the Ray cluster at {address} within {CONNECT_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RayClusterError(f"cannot connect to the Ray cluster at {address}: {lines[-1] if lines else 'no output'}")
    resources: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return resources


def check_ray_executor(model: ModelFile, resources: ClusterResources = cluster_resources) -> str:
    """Fail with a clear message unless the cluster is reachable and holds TP x PP GPUs; return its address."""
    e = model.engine
    address = ray_address(model)
    if address is None:
        raise RayClusterError(
            f"{model.name}: engine.distributed_executor_backend is ray but no Ray cluster is given: "
            f"set ray.address in the model file or {RAY_ADDRESS_ENV} (start one with `ray start --head`)"
        )
    try:
        total = resources(address)
    except RayClusterError as exc:
        raise RayClusterError(f"{model.name}: {exc}") from None
    gpus = total.get("GPU", 0.0)
    if gpus < e.world_size:
        raise RayClusterError(
            f"{model.name}: tensor_parallel_size {e.tensor_parallel_size} x pipeline_parallel_size "
            f"{e.pipeline_parallel_size} needs {e.world_size} GPUs, but the Ray cluster at {address} has {gpus:g}; "
            "start the missing worker nodes (`ray start --address=...`) or lower the parallel sizes"
        )
    return address
