"""`llmserve bench gateway` end to end, briefly: real upstream, real gateway, wrk, and the report it writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtests.gateway_bench_client import Session, check_exchange, request_bytes
from loadtests.gateway_bench_procs import ROOT
from serve.engine.process import free_port


def need_wrk() -> None:
    if shutil.which("wrk") is None:
        reason = "wrk is not installed (Debian: apt-get install wrk)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the gateway benchmark's test")
        pytest.skip(reason)
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the benchmark pins the gateway and the load to two different cores; this machine has one")


def test_short_run_reports_every_phase_with_requests_served(tmp_path: Path) -> None:
    need_wrk()
    out = tmp_path / "report.json"
    cores = sorted(os.sched_getaffinity(0))[:2]
    argv = [sys.executable, "-m", "serve.cli", "bench", "gateway", "--duration", "1", "--warmup", "0"]
    argv += ["--connections", "2", "--ttft-requests", "10", "--events", "4", "--out", str(out)]
    argv += ["--gateway-cpu", str(cores[0]), "--load-cpu", str(cores[1])]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 3), done.stderr[-3000:]
    report = json.loads(out.read_text())
    # Exit 3 means the report names what makes its numbers suspect; 0 means nothing did.
    assert (done.returncode == 3) == bool(report["problems"])

    assert [g["name"] for g in report["gateways"]] == [ROOT.name]
    gateway = ROOT.name
    phases = {(p["target"], p["kind"]): p for p in report["phases"]}
    assert set(phases) == {(t, k) for t in ("direct", gateway) for k in ("plain", "stream")}
    for (target, kind), phase in phases.items():
        assert phase["requests"] > 0 and phase["failed"] == 0, (target, kind, phase["errors"])
        assert phase["rps"] > 0
        assert 0 < phase["latency_ms"]["p50"] <= phase["latency_ms"]["p99"]
        processes = phase["cpu"]["processes"]
        assert set(processes) == {gateway, "upstream", "wrk", "bench"}
        assert processes["wrk"] > 0, "wrk's CPU time is taken from the children this process waited for"
        busy = processes[gateway] if target == gateway else processes["upstream"]
        assert busy > 0, f"the process serving {target} used no CPU"

    for kind in ("plain", "stream"):
        against = report["ratios"][gateway][kind]["vs_direct"]
        assert against["rps"] == pytest.approx(phases[(gateway, kind)]["rps"] / phases[("direct", kind)]["rps"])
    ttft = report["ttft"]
    assert ttft["requests"] == 10
    assert ttft["direct_ms"]["p50"] > 0 and ttft["gateways"][gateway]["p50_ms"] > 0
    assert report["settings"]["events"] == 4
    assert f"{gateway} vs direct, plain" in done.stdout


def test_instant_upstream_streams_the_events_asked_for_and_keeps_the_connection() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "loadtests.instant_upstream", "--port", str(port), "--events", "5"]
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        stream = Session(url, request_bytes(url, b'{"model": "m", "stream": true}', "k"))
        plain = Session(url, request_bytes(url, b'{"model":"m","stream":false}', "k"))
        for _ in range(50):
            try:
                first = stream.exchange()
                break
            except ConnectionRefusedError:
                stream.close()
                time.sleep(0.1)
        else:
            pytest.fail("the instant upstream did not start")
        check_exchange("upstream", first, stream=True, events=5)
        sock = stream.sock
        # Keep-alive: the second streamed answer comes on the same connection, whole.
        check_exchange("upstream", stream.exchange(), stream=True, events=5)
        assert stream.sock is sock
        check_exchange("upstream", plain.exchange(), stream=False, events=5)
        stream.close()
        plain.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
