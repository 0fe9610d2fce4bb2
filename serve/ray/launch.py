"""How `up` runs a Ray Serve model: one child process that owns the deployment (and a local cluster)."""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from serve.config.model_file import ModelFile
from serve.engine.process import ChildProcess, ProcessStartError, free_port
from serve.ray.cluster import INSTALL_HINT, ray_address

# Ray reads these at start; they make a local cluster bind every server it starts to loopback (the switch Ray
# uses on laptops) and require a token on its gRPC and HTTP APIs, one per run and never written to disk.
LOCAL_CLUSTER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray runs its workers at nice 15, and the vLLM engine inside a replica inherits it. Measured on 2 busy cores:
    # 5 output tok/s at 8 streams beside normal-priority load, against 79 when the machine was quiet.
    "RAY_worker_niceness": "0",
}


# What stopping Ray Serve and a local cluster takes beyond the engine's own shutdown (measured: ~10 s).
RAY_STOP_SECONDS = 20


@dataclass(frozen=True)
class RayServeChild:
    child: ChildProcess
    url: str
    ready_file: Path


def ray_serve_child(
    model: ModelFile, model_path: Path, weights: str, state_dir: Path, taken_ports: set[int]
) -> RayServeChild:
    """The runner for `model`; its HTTP port is the file's or a free one, never one in `taken_ports`."""
    ray = model.ray
    if ray is None or ray.serve is None:
        raise ValueError(f"{model.name} has no ray.serve section")
    if importlib.util.find_spec("ray") is None:
        raise ProcessStartError(f"{model.name} runs on Ray Serve, but {INSTALL_HINT}")
    port = ray.serve.port
    if port is None:
        port = free_port()
        while port in taken_ports:
            port = free_port()
    elif port in taken_ports:
        raise ProcessStartError(f"{model.name}: ray.serve.port {port} is already taken (the gateway's port?)")
    safe = model.name.replace("/", "_")
    ready_file = state_dir / "run" / f"ray-serve-{safe}.ready"
    ready_file.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "serve.ray.runner",
        "--model-file",
        str(model_path.resolve()),
        "--weights",
        weights,
        "--port",
        str(port),
        "--ready-file",
        str(ready_file),
        "--stop-timeout",
        str(model.engine.shutdown_timeout + RAY_STOP_SECONDS),
    ]
    address = ray_address(model)
    if address is None:
        argv += ["--num-cpus", str(ray.local_num_cpus)]
        env = {**LOCAL_CLUSTER_ENV, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    else:
        # The cluster's own token (RAY_AUTH_TOKEN or its file) comes from the environment, as for `ray` itself.
        argv += ["--address", address]
        env = {}
    child = ChildProcess(
        name=f"ray serve {model.name}",
        argv=argv,
        env=env,
        log_path=state_dir / "logs" / f"ray-serve-{safe}.log",
    )
    return RayServeChild(child=child, url=f"http://127.0.0.1:{port}", ready_file=ready_file)


async def wait_deployed(child: ChildProcess, ready_file: Path, within: float) -> None:
    """Ray Serve's proxy answers before the replicas are up: the runner's ready file says they are."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(ready_file.exists):
        if not child.running:
            problem = "exited before its application ran"
        elif time.monotonic() > deadline:
            problem = f"was not deployed after {within:.0f}s"
        else:
            await asyncio.sleep(1.0)
            continue
        raise ProcessStartError(f"{child.name} {problem}. Last log lines:\n{child.tail()}")
