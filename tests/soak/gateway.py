"""The soak's gateway: `llmserve gateway` in a process of its own, with Redis limits, in front of the stack's engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
DRAIN_TIMEOUT = 10.0


@dataclass
class SoakGateway:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    # The JSON access log (stdout) and everything else it logs (stderr).
    access_log: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int:
        """SIGTERM: the gateway drains, then exits; its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=DRAIN_TIMEOUT + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -signal.SIGKILL


def start_gateway(
    folder: Path,
    *,
    engine_url: str,
    engine_key: str,
    model_file: str,
    tokenizer: str | None,
    keys_file: Path,
    redis_url: str,
    key_prefix: str,
    metrics_key: str,
) -> SoakGateway:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    entry: dict[str, object] = {"file": model_file, "endpoints": [engine_url]}
    if tokenizer:
        entry["tokenizer"] = tokenizer
    config = {
        "host": "127.0.0.1",
        "port": port,
        "keys_file": str(keys_file),
        "drain_timeout": DRAIN_TIMEOUT,
        "limits": {"backend": "redis", "key_prefix": key_prefix},
        "models": [entry],
    }
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {
        **os.environ,
        "LLMSERVE_HOME": str(folder / "home"),
        "LLMSERVE_ENGINE_KEY": engine_key,
        "LLMSERVE_REDIS_URL": redis_url,
        "LLMSERVE_METRICS_KEY": metrics_key,
        # Every access-log line reaches the file as it is written, so the test can read it while the load runs.
        "PYTHONUNBUFFERED": "1",
    }
    access, log = folder / "gateway-access.jsonl", folder / "gateway.log"
    with access.open("wb") as out, log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "gateway", "--config", str(path)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
        )
    gateway = SoakGateway(url=f"http://127.0.0.1:{port}", port=port, proc=proc, access_log=access, log=log)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{gateway.url}/readyz", timeout=2).status_code == 200:
                return gateway
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            gateway.stop()
            raise RuntimeError(f"the gateway was not ready in 60 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)
