"""`bench compare`: the transformers baseline, vLLM direct and the gateway on the same model and seeded requests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from loadtests.config import ROOT
from loadtests.runner import Target
from serve.config.settings import StateFolder
from serve.engine.process import free_port

BASELINE_STARTUP_S = 300


class CompareError(Exception):
    """The targets of a comparison cannot be found or started; the message says what to do."""


@dataclass(frozen=True)
class RunningStack:
    """What `llmserve up` left in its state folder: the gateway, the first model's engine and its model file."""

    gateway_url: str
    gateway_key: str
    engine_url: str
    model_file: Path
    # Every engine of the model behind the gateway (default: the one engine_url names).
    engine_urls: tuple[str, ...] = ()


def discover(state: StateFolder) -> RunningStack:
    runtime, key_path = state.runtime_gateway, state.dev_key
    if not runtime.exists() or not key_path.exists():
        raise CompareError(
            f"no running stack under {state.root} (no {runtime.name} or {key_path.name}): start `llmserve up`"
        )
    data = yaml.safe_load(runtime.read_text())
    models = data.get("models") or []
    if not models or not models[0].get("endpoints"):
        raise CompareError(f"{runtime} lists no engine endpoint")
    host = data.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return RunningStack(
        gateway_url=f"http://{host}:{data.get('port', 8000)}",
        gateway_key=key_path.read_text().strip(),
        engine_url=models[0]["endpoints"][0],
        model_file=Path(models[0]["file"]),
        engine_urls=tuple(models[0]["endpoints"]),
    )


def wait_healthy(url: str, proc: subprocess.Popen[bytes], within: float, log: Path) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CompareError(f"the baseline server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise CompareError(f"the baseline server was not healthy within {within:.0f}s; see {log}")


@contextmanager
def baseline_server(weights: str, served_name: str, dtype: str, log: Path, threads: int | None = None) -> Iterator[str]:
    """Run the transformers baseline on a free loopback port for the duration of the block; yields its URL."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "loadtests.baselines.hf_server",
        "--model",
        weights,
        "--served-model-name",
        served_name,
        "--dtype",
        dtype,
        "--port",
        str(port),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("BASELINE_API_KEY", None)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, BASELINE_STARTUP_S, log)
            yield url
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def targets(
    stack: RunningStack, engine_key: str | None, model: str, baseline_url: str | None, metrics_key: str | None = None
) -> list[Target]:
    """The baseline (when there is one), vLLM direct and the gateway; the engines' own token counters are read
    for the last two (the gateway's over every engine of the model behind it), and the gateway's CPU for the last
    (its /metrics asks for `metrics_key` when one is set)."""
    out = []
    if baseline_url:
        out.append(Target("baseline", baseline_url, None, model))
    direct = (f"{stack.engine_url}/metrics",)
    behind = tuple(f"{url}/metrics" for url in stack.engine_urls) or direct
    out.append(Target("vllm", stack.engine_url, engine_key, model, direct))
    meter = (f"{stack.gateway_url}/metrics",)
    out.append(Target("gateway", stack.gateway_url, stack.gateway_key, model, behind, meter, metrics_key))
    return out
