"""`llmserve gateway` as a real process: drain on SIGTERM, JSON access log, no secrets or prompts in logs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from serve.config.keys import create_key
from serve.protocol.metrics_text import series_sums
from tests.integration.conftest import ENGINE_KEY, model_file
from tests.integration.fake_engine import FakeEngine
from tests.servers import free_port, run_server

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class GatewayProcess:
    url: str
    key: str
    proc: subprocess.Popen[str]
    engine: FakeEngine

    def post(self, body: dict[str, object], key: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {key or self.key}"}
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[GatewayProcess]:
    engine = FakeEngine()
    with run_server(engine.app()) as engine_url:
        key, _ = create_key(tmp_path / "keys.yaml", "test")
        port = free_port()
        config = {
            "host": "127.0.0.1",
            "port": port,
            "keys_file": str(tmp_path / "keys.yaml"),
            "drain_timeout": 10,
            "models": [{"file": str(model_file(tmp_path, "m", engine_url, []))}],
        }
        (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "gateway", "--config", str(tmp_path / "gateway.yaml")],
            cwd=ROOT,
            env={"LLMSERVE_ENGINE_KEY": ENGINE_KEY, "PATH": "/usr/bin:/bin"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)
        try:
            yield GatewayProcess(url=url, key=key, proc=proc, engine=engine)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigterm_drains_streams_in_flight_and_refuses_new_work(gateway_process: GatewayProcess) -> None:
    gw = gateway_process
    gw.engine.chunks, gw.engine.delay = 15, 0.2  # a 3 s stream
    received: list[str] = []

    def stream() -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
        headers = {"authorization": f"Bearer {gw.key}"}
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as resp:
            received.extend(resp.iter_lines())

    reader = threading.Thread(target=stream)
    reader.start()
    while not gw.engine.sent_at:
        time.sleep(0.02)
    gw.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = httpx.get(f"{gw.url}/readyz")
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
    refused = gw.post({"model": "m", "messages": [{"role": "user", "content": "y"}]})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    reader.join(timeout=20)
    assert "data: [DONE]" in received, "the stream in flight was cut by the drain"
    assert gw.proc.wait(timeout=20) == 0


def test_access_log_is_json_without_keys_or_prompts(gateway_process: GatewayProcess) -> None:
    gw = gateway_process
    canary_prompt = "canary-prompt-7f3a9c"
    canary_key = "sk-llms-canary-key-5e1d2b"
    ok = gw.post(
        {"model": "m", "messages": [{"role": "user", "content": canary_prompt}]},
    )
    assert ok.status_code == 200
    assert (
        gw.post({"model": "m", "messages": [{"role": "user", "content": canary_prompt}]}, key=canary_key).status_code
        == 401
    )
    metrics = httpx.get(f"{gw.url}/metrics").text
    # The process's own cost, as every Prometheus-scraped service reports it.
    usage = series_sums(metrics, ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"))
    assert usage.get("process_cpu_seconds_total", 0) > 0 and usage.get("process_resident_memory_bytes", 0) > 1e6
    assert usage.get("process_open_fds", 0) > 0
    gw.proc.send_signal(signal.SIGTERM)
    out, err = gw.proc.communicate(timeout=30)
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    done = [r for r in records if r["status"] == 200 and r["route"] == "/v1/chat/completions"]
    assert len(done) == 1
    record = done[0]
    assert record["model"] == "m" and record["key_id"].startswith("key_")
    assert record["prompt_tokens"] == 7 and record["completion_tokens"] == 3
    assert record["endpoint"].startswith("http://127.0.0.1:") and record["duration_s"] > 0
    assert record["request_id"] == ok.headers["x-request-id"]
    assert any(r["status"] == 401 and r["key_id"] == "none" for r in records)
    for text in (out, err, metrics):
        for secret in (canary_prompt, canary_key, gw.key, ENGINE_KEY):
            assert secret not in text
