"""`llmserve bench run`, `quality` and `ui` end to end against loopback servers: reports, exit codes, the web UI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from loadtests.quality import questions
from serve.cli import parser
from serve.config.model_file import load_model_file
from serve.engine.process import free_port
from tests.integration.loadtest_servers import ScriptedEngine
from tests.servers import run_server

ROOT = Path(__file__).resolve().parents[2]
TOTAL = len(questions())


@pytest.fixture
def oracle() -> Iterator[str]:
    with run_server(ScriptedEngine(chunks=5, delay=0.1).app()) as url:
        yield url


def quality(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    args = parser().parse_args(["bench", "quality", *argv])
    code = args.func(args)
    return code, capsys.readouterr().out


def test_quality_scores_a_target_against_the_baseline(
    tmp_path: Path, oracle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    two_wrong = ScriptedEngine(wrong={"capital-japan", "mul-7-8"})
    with run_server(two_wrong.app()) as url:
        code, out = quality(capsys, "--url", url, "--model", "m", "--baseline-url", oracle, "--out", str(tmp_path))
    assert code == 0, out  # two below the baseline is within the default tolerance
    assert f"target    {TOTAL - 2}/{TOTAL}" in out and f"baseline  {TOTAL}/{TOTAL}" in out
    assert "capital-japan: What is the capital of Japan? (expected Tokyo)" in out
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["results"]["target"]["correct"] == TOTAL - 2 and saved["failures"] == []
    asked = two_wrong.requests[0]
    assert asked["temperature"] == 0 and asked["stream"] is False and asked["max_tokens"] == 64
    assert "ignore_eos" not in asked


def test_quality_more_than_the_tolerance_below_the_baseline_exits_1(
    oracle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with run_server(ScriptedEngine(wrong={"capital-japan", "mul-7-8", "sky-color"}).app()) as url:
        code, out = quality(capsys, "--url", url, "--model", "m", "--baseline-url", oracle)
    assert code == 1
    assert f"FAILED quality: target answered {TOTAL - 3}/{TOTAL}, more than 2 below baseline's" in out


def test_run_writes_counts_flags_and_quality_into_the_report(tmp_path: Path, oracle: str) -> None:
    out = tmp_path / "run"
    argv = ["--url", oracle, "--model", "m", "--users", "2", "--warmup", "1", "--num-requests", "4"]
    argv += ["--output-len", "5", "--stop-timeout", "10", "--max-error-rate", "0", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "serve.cli", "bench", "run", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"bench: quality of target: {TOTAL}/{TOTAL} correct" in done.stderr
    # Progress lines while the level runs (not a terminal: plain lines), and the warning as it ends.
    assert "bench: target at u2: starting Locust" in done.stderr or "requests done" in done.stderr
    assert "bench: WARNING target at u2: only" in done.stderr
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| target | 2 *few samples* |"))
    assert row.endswith(f"| {TOTAL}/{TOTAL} |") and "(n=" in row
    assert "requests per level 4" in report
    summary = json.loads((out / "summary.json").read_text())
    (result,) = summary["results"]
    assert result["valid"] and result["low_samples"] and result["samples"]["measured"] >= 4
    assert summary["quality"]["target"]["correct"] == TOTAL
    # Without --model-file, sampling comes from the default model file's policy.
    default = load_model_file(ROOT / "configs/models/smollm2-135m-cpu.yaml").policy.defaults
    assert summary["config"]["num_requests"] == 4 and summary["sampling"] == {"temperature": default["temperature"]}


def test_ui_serves_locust_web_ui_on_loopback_and_runs_the_scenarios(oracle: str, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "serve.cli", "bench", "ui", "--url", oracle, "--model", "m", "--web-port", str(port)]
    cmd += ["--output-len", "5", "--warmup", "0"]
    log = (tmp_path / "ui.log").open("wb")
    # A session of its own: whatever happens below, the whole group can be ended and nothing outlives the test.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    web = f"http://127.0.0.1:{port}"
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "ui.log").read_text()
            try:
                if httpx.get(web, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "ui.log").read_text()
            time.sleep(0.3)
        # Only loopback: the UI can start load against any host, so it must not listen on every interface.
        listening = {
            c.laddr.ip
            for p in (psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True))
            for c in p.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert listening == {"127.0.0.1"}, listening
        children = psutil.Process(proc.pid).children(recursive=True)
        started = httpx.post(f"{web}/swarm", data={"user_count": "2", "spawn_rate": "2", "host": oracle}, timeout=10)
        assert started.json()["success"], started.text
        names: set[str] = set()
        deadline = time.monotonic() + 30
        while not {"TTFT", "TPOT", "E2E"} <= names and time.monotonic() < deadline:
            time.sleep(0.5)
            stats = httpx.get(f"{web}/stats/requests", timeout=10).json()["stats"]
            names = {s["method"] for s in stats if s["num_requests"] > 0}
        assert {"TTFT", "TPOT", "E2E"} <= names, stats
        httpx.get(f"{web}/stop", timeout=10)
    finally:
        # SIGINT to `bench ui` alone, as `kill -INT` sends it (a terminal's Ctrl-C reaches the whole group).
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        for c in left:
            c.kill()
    # Locust ended with the command that started it.
    assert children and not left, left
