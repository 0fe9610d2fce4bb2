"""What the gateway costs: added time to first token and requests/s of one gateway worker, on an instant upstream.

Starts an instant upstream and `llmserve gateway` (one uvicorn worker) as their own processes on loopback, then
measures from this process, alternating direct and gateway requests so both see the same machine noise:

    python -m loadtests.gateway_overhead --requests 400 --concurrency 32 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from serve.config.keys import create_key
from serve.engine.process import free_port

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "instant", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


@contextmanager
def processes(tmp: Path) -> Iterator[tuple[str, str, str]]:
    """Yields (upstream URL, gateway URL, key)."""
    up_port, gw_port = free_port(), free_port()
    upstream_url, gateway_url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    key, _ = create_key(tmp / "keys.yaml", "bench")
    model = {
        "name": "instant",
        "source": "org/instant",
        "engine": {"max_model_len": 4096},
        "policy": {"max_tokens_cap": 1024},
        "endpoints": [upstream_url],
    }
    (tmp / "instant.yaml").write_text(yaml.safe_dump(model))
    gateway = {
        "host": "127.0.0.1",
        "port": gw_port,
        "keys_file": str(tmp / "keys.yaml"),
        "log_level": "warning",
        "models": [{"file": str(tmp / "instant.yaml")}],
    }
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(gateway))
    env = {**os.environ, "LLMSERVE_ENGINE_KEY": "bench-engine-key"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "loadtests.instant_engine", "--port", str(up_port)], cwd=ROOT),
        subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "gateway", "--config", str(tmp / "gateway.yaml")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
        ),
    ]
    try:
        wait_ready(f"{upstream_url}/health", procs[0])
        wait_ready(f"{gateway_url}/readyz", procs[1])
        yield upstream_url, gateway_url, key
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


async def ttft(client: httpx.AsyncClient, url: str, key: str) -> float:
    start = time.perf_counter()
    body = {**BODY, "stream": True}
    async with client.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
    ) as resp:
        resp.raise_for_status()
        first: float | None = None
        async for line in resp.aiter_lines():
            if first is None and '"content":"tok' in line:
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("no token in the stream")
    return first


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_ttft(upstream: str, gateway: str, key: str, requests: int) -> dict[str, float]:
    direct: list[float] = []
    proxied: list[float] = []
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(20):  # warm-up: connections, caches
            await ttft(client, upstream, key)
            await ttft(client, gateway, key)
        for _ in range(requests):
            direct.append(await ttft(client, upstream, key))
            proxied.append(await ttft(client, gateway, key))
    ms = 1000.0
    return {
        "direct_p50_ms": pct(direct, 0.5) * ms,
        "direct_p99_ms": pct(direct, 0.99) * ms,
        "gateway_p50_ms": pct(proxied, 0.5) * ms,
        "gateway_p99_ms": pct(proxied, 0.99) * ms,
        "added_p50_ms": (pct(proxied, 0.5) - pct(direct, 0.5)) * ms,
        "added_p99_ms": (pct(proxied, 0.99) - pct(direct, 0.99)) * ms,
        "added_median_of_pairs_ms": statistics.median(p - d for p, d in zip(proxied, direct, strict=True)) * ms,
    }


async def throughput(url: str, key: str, concurrency: int, seconds: float, stream: bool) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        headers = {"authorization": f"Bearer {key}"}
        while time.perf_counter() < stop:
            if stream:
                async with client.stream(
                    "POST", f"{url}/v1/chat/completions", json={**BODY, "stream": True}, headers=headers
                ) as resp:
                    resp.raise_for_status()
                    await resp.aread()
            else:
                (await client.post(f"{url}/v1/chat/completions", json=BODY, headers=headers)).raise_for_status()
            done += 1

    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


async def run(args: argparse.Namespace, upstream: str, gateway: str, key: str) -> dict[str, object]:
    result: dict[str, object] = {"ttft": await measure_ttft(upstream, gateway, key, args.requests)}
    rates: dict[str, float] = {}
    for stream in (False, True):
        kind = "stream" if stream else "plain"
        rates[f"direct_{kind}_rps"] = await throughput(upstream, key, args.concurrency, args.seconds, stream)
        rates[f"gateway_{kind}_rps"] = await throughput(gateway, key, args.concurrency, args.seconds, stream)
    result["throughput"] = rates
    result["settings"] = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
        "note": "load generator, gateway and upstream share this machine",
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="sequential streamed requests per target for TTFT")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, processes(Path(tmp)) as (upstream, gateway, key):
        result = asyncio.run(run(args, upstream, gateway, key))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
