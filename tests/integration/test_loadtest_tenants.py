"""`llmserve bench run --tenants` through Locust against a real gateway in front of the fake engine: two keys at
once, each tenant's requests under its own key, one report with a row per tenant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from serve.config.gateway import GatewayFile, build_settings
from serve.config.keys import create_key
from serve.gateway.app import create_app
from tests.integration.conftest import ENGINE_KEY, model_file
from tests.integration.fake_engine import FakeEngine
from tests.metrics_text import metric_sum
from tests.servers import run_server

ROOT = Path(__file__).resolve().parents[2]


def request_records(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if json.loads(line).get("type") == "request")


def test_two_tenants_run_at_once_each_with_its_own_key(tmp_path: Path) -> None:
    # Output events 20 ms apart (an engine that streams); two places per engine, so the noisy tenant's four users
    # queue in the gateway and the quiet tenant's interactive key goes ahead of them.
    engine = FakeEngine(chunks=5, delay=0.02)
    keys_path = tmp_path / "keys.yaml"
    noisy_key, noisy = create_key(keys_path, "noisy", priority="standard")
    quiet_key, quiet = create_key(keys_path, "quiet", priority="interactive")
    (tmp_path / "quiet.key").write_text(quiet_key + "\n")
    tenants = {
        "tenants": [
            {"name": "noisy", "key_env": "NOISY_TEST_KEY", "users": 4, "input_len": 16, "output_len": 5},
            {"name": "quiet", "key_file": "quiet.key", "rate": 2, "input_len": 16, "output_len": 5, "seed": 1},
        ]
    }
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    with run_server(engine.app()) as engine_url:
        path = model_file(tmp_path, "m", engine_url, [], {"scheduling": {"max_running_per_engine": 2}})
        file = GatewayFile.model_validate({"keys_file": keys_path, "models": [{"file": path}], "health_interval": 0.5})
        with run_server(create_app(build_settings(file, base_dir=tmp_path, engine_key=ENGINE_KEY))) as url:
            out = tmp_path / "run"
            argv = ["--url", url, "--model", "m", "--tenants", str(tmp_path / "tenants.yaml"), "--no-quality"]
            argv += ["--warmup", "1", "--duration", "5", "--stop-timeout", "10", "--max-error-rate", "0"]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "NOISY_TEST_KEY": noisy_key}
            env.pop("LLMSERVE_API_KEY", None)
            done = subprocess.run(
                [sys.executable, "-m", "serve.cli", "bench", "run", *argv, "--out", str(out)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "bench: tenants noisy (4 users), quiet (2 req/s poisson) ..." in done.stderr
    assert "bench: noisy at u4:" in done.stderr and "bench: quiet at r2:" in done.stderr
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["noisy", "quiet", "**all tenants**"], report
    summary = json.loads((out / "summary.json").read_text())
    by_name = {r["target"]: r for r in summary["results"]}
    for name in ("noisy", "quiet"):
        assert by_name[name]["valid"], by_name[name]["problems"]
        assert by_name[name]["requests"]["ok"] > 0 and by_name[name]["requests"]["failed"] == 0
    assert by_name["noisy"]["window"] == by_name["quiet"]["window"]
    assert summary["tenants_total"]["output_tok_s"] == (
        by_name["noisy"]["output_tok_s"] + by_name["quiet"]["output_tok_s"]
    )
    # Every request a tenant sent reached the gateway under that tenant's key, and only those.
    for name, record in (("noisy", noisy), ("quiet", quiet)):
        (raw,) = (out / "raw").glob(f"{name}-*.jsonl")
        sent = request_records(raw)
        assert sent > 0 and metric_sum(metrics, "gateway_requests_total", key=record.id) == sent, name
        assert metric_sum(metrics, "gateway_served_tokens_total", key=record.id) > 0, name
    assert noisy_key not in report + json.dumps(summary) and quiet_key not in report + json.dumps(summary)
