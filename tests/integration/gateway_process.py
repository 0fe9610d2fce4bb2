"""A real `llmserve gateway` process on loopback with settings of a test's choosing, and what /proc says about it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve.config.keys import create_key
from serve.engine.process import free_port
from tests.integration.conftest import ENGINE_KEY, model_file

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class GatewayProcess:
    url: str
    port: int
    key: str
    proc: subprocess.Popen[bytes]
    stderr: Path

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def reset_peak_memory(self) -> None:
        # Linux: writing 5 to clear_refs sets the peak resident size (VmHWM) to the current one.
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def peak_memory_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc/PID/status")

    def workers(self) -> list[int]:
        """The worker processes of a supervisor (multiprocessing's helper processes left out)."""
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        found = []
        for child in children:
            with suppress(FileNotFoundError):
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
        return found

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


@contextmanager
def gateway_process(
    tmp_path: Path, engine_url: str, args: tuple[str, ...] = (), **settings: Any
) -> Iterator[GatewayProcess]:
    """Starts the gateway in a session of its own (so a test can signal its whole group) and waits until ready."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    key, _ = create_key(tmp_path / "keys.yaml", "test")
    port = free_port()
    config = {
        "host": "127.0.0.1",
        "port": port,
        "keys_file": str(tmp_path / "keys.yaml"),
        "health_interval": 0.5,
        "models": [{"file": str(model_file(tmp_path, "m", engine_url, []))}],
        **settings,
    }
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    stderr = tmp_path / "gateway.err"
    with (tmp_path / "gateway.out").open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "gateway", "--config", str(tmp_path / "gateway.yaml"), *args],
            cwd=ROOT,
            env={"LLMSERVE_ENGINE_KEY": ENGINE_KEY, "PATH": "/usr/bin:/bin"},
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    gateway = GatewayProcess(url=f"http://127.0.0.1:{port}", port=port, key=key, proc=proc, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while True:
            with suppress(httpx.HTTPError):
                if httpx.get(f"{gateway.url}/readyz", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, f"gateway did not start:\n{gateway.log()}"
            time.sleep(0.1)
        yield gateway
    finally:
        # The whole group: workers too, even when their supervisor is already gone.
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
