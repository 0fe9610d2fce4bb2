"""One real stack per test session: `llmserve up` (vLLM CPU engine + gateway) started as a user would."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serve.config.model_file import load_model_file
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 900


@dataclass
class RunningStack:
    url: str
    key: str
    engine_url: str
    engine_key: str
    model: str
    home: Path
    proc: subprocess.Popen[bytes]

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def start_stack(home: Path, model_file: str, *more: str, extra_env: dict[str, str] | None = None) -> RunningStack:
    """Start `llmserve up` (one model file, or several) on free ports; wait until the gateway is ready."""
    home.mkdir(parents=True, exist_ok=True)
    gateway_cfg = home / "gateway.yaml"
    gateway_cfg.write_text(yaml.safe_dump({"keys_file": str(home / "keys.yaml"), "drain_timeout": 5}))
    port = free_port()
    engine_key = secrets.token_urlsafe(16)
    env = {**os.environ, **(extra_env or {}), "LLMSERVE_HOME": str(home), "LLMSERVE_ENGINE_KEY": engine_key}
    log = (home / "up.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serve.cli",
            "up",
            *(arg for path in (model_file, *more) for arg in ("--model", path)),
            "--port",
            str(port),
            "--gateway-config",
            str(gateway_cfg),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llmserve up exited with {proc.returncode}:\n{(home / 'up.log').read_text()[-5000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_stack_process(proc)
            raise RuntimeError(f"stack not ready after {STARTUP_SECONDS}s:\n{(home / 'up.log').read_text()[-5000:]}")
        time.sleep(1)
    runtime = yaml.safe_load((home / "run" / "gateway.yaml").read_text())
    # The merged file: a model file may take its name from the one it extends.
    model = load_model_file(runtime["models"][0]["file"]).name
    return RunningStack(
        url=url,
        key=(home / "dev-key").read_text().strip(),
        engine_url=runtime["models"][0]["endpoints"][0],
        engine_key=engine_key,
        model=model,
        home=home,
        proc=proc,
    )


def stop_stack_process(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def stop_and_check(stack: RunningStack) -> None:
    """Ctrl-C must stop every process the stack started: none may outlive it."""
    children = stack.descendants()
    assert children, "the stack should have child processes while running"
    code = stop_stack_process(stack.proc)
    gone, alive = psutil.wait_procs(children, timeout=30)
    leftovers = [f"{p.pid} {p.name()}" for p in alive]
    for p in alive:
        p.kill()
    assert not leftovers, f"processes left behind after Ctrl-C: {leftovers}"
    assert code == 0, f"llmserve up exited with {code}:\n{(stack.home / 'up.log').read_text()[-3000:]}"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(tmp_path_factory.mktemp("stack"), "configs/models/smollm2-135m-cpu.yaml")
    yield running
    stop_and_check(running)
