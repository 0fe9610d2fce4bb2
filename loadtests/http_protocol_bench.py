"""What the HTTP server protocol costs per request: requests/s of a trivial ASGI app under uvicorn, per protocol.

The server runs pinned to CPU 0 and `wrk` (Debian package `wrk`) to CPU 1, 32 connections, rounds alternating the
protocols so they see the same machine noise; GET and a POST with a 1 KiB body. Besides requests/s it reports requests
per CPU-second of the server, which other load on a shared machine disturbs least:

    python -m loadtests.http_protocol_bench --seconds 10 --rounds 3

Protocols: uvicorn's httptools (stock), the gateway's bounded httptools protocol, and h11 with
`h11_max_incomplete_event_size` (uvicorn's own bounded head). The load generator's CPU is reported too: below 90%
of its core it is not what limits the numbers.

On a machine other work shares, instructions per request are steadier than any rate: `--instructions` feeds each
protocol the same requests in one process, without sockets, under valgrind's callgrind (Debian package `valgrind`)
and reports the instructions one request costs:

    python -m loadtests.http_protocol_bench --instructions
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import uvloop
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from serve.engine.process import free_port
from serve.gateway.http_protocol import HttpLimits, bounded_protocol

PROTOCOLS = ("httptools", "bounded", "h11-bounded")
POST_LUA = 'wrk.method = "POST"\nwrk.body = string.rep("x", 1024)\nwrk.headers["Content-Type"] = "application/json"\n'
LIMITS = HttpLimits(
    max_head_bytes=32 * 1024, header_timeout=10.0, body_timeout=10.0, body_min_rate=8192, max_connections=4096
)


async def app(scope: dict[str, object], receive: object, send: object) -> None:
    """Reads the whole body and answers two bytes: the least an app can do."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()  # type: ignore[operator]
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


def serve(protocol: str, port: int) -> None:
    options: dict[str, object] = {}
    if protocol == "bounded":
        options["http"] = bounded_protocol(LIMITS)
    elif protocol == "h11-bounded":
        options["http"] = "h11"
        options["h11_max_incomplete_event_size"] = LIMITS.max_head_bytes
    else:
        options["http"] = "httptools"
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        ws="none",
        lifespan="off",
        log_level="warning",
        access_log=False,
        **options,  # type: ignore[arg-type]
    )


class Transport(asyncio.Transport):
    """A socket that takes every write and never closes: the protocol's own work is all that is left."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


REQUESTS = {
    "get": b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n",
    "post_1k": b"POST / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
    + b"Content-Length: 1024\r\n\r\n"
    + b"x" * 1024,
}


def feed(protocol: str, kind: str, count: int) -> None:
    """`count` keep-alive requests through one connection of `protocol`, each answered before the next."""
    classes: dict[str, type[asyncio.Protocol]] = {
        "httptools": HttpToolsProtocol,
        "bounded": bounded_protocol(LIMITS),
        "h11-bounded": H11Protocol,
    }
    config = uvicorn.Config(
        app, log_config=None, ws="none", lifespan="off", h11_max_incomplete_event_size=LIMITS.max_head_bytes
    )
    config.load()

    async def run() -> None:
        proto: Any = classes[protocol](config=config, server_state=ServerState(), app_state={})  # type: ignore[call-arg]
        transport = Transport()
        proto.connection_made(transport)
        for _ in range(count):
            proto.data_received(REQUESTS[kind])
            # Two turns of the loop: the app's task runs and answers.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        assert transport.writes >= count, "not every request was answered"

    uvloop.run(run())


def instructions(protocol: str, kind: str, count: int) -> int:
    argv = [sys.executable, "-m", "loadtests.http_protocol_bench", "feed", protocol, kind, str(count)]
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stderr
    found = re.search(r"Collected : (\d+)", out)
    if found is None:
        raise RuntimeError(f"callgrind said:\n{out}")
    return int(found.group(1))


def count_instructions(count: int) -> dict[str, dict[str, int | float]]:
    """Instructions per request: a run of `count` requests less a run of none (start-up and imports)."""
    result: dict[str, dict[str, int | float]] = {}
    for protocol in PROTOCOLS:
        result[protocol] = {}
        for kind in REQUESTS:
            per_request = (instructions(protocol, kind, count) - instructions(protocol, kind, 0)) // count
            result[protocol][kind] = per_request
    for protocol in PROTOCOLS:
        for kind in REQUESTS:
            stock = result["httptools"][kind]
            result[protocol][f"{kind}_vs_stock"] = round(result[protocol][kind] / stock, 3)
    return result


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, seconds: float, connections: int, script: Path | None) -> dict[str, float]:
    argv = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    proc = subprocess.Popen([*argv, url], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, _, usage = os.wait4(proc.pid, 0)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if rate is None or p99 is None:
        raise RuntimeError(f"wrk said:\n{out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {
        "req_s": float(rate.group(1)),
        "p99_ms": float(p99.group(1)) * scale,
        "non_2xx": float(errors.group(1)) if errors else 0.0,
        "wrk_cpu": (usage.ru_utime + usage.ru_stime) / seconds,
    }


def measure(protocol: str, seconds: float, connections: int, script: Path) -> dict[str, dict[str, float]]:
    port = free_port()
    argv = ["taskset", "-c", "0", sys.executable, "-m", "loadtests.http_protocol_bench", "serve", protocol, str(port)]
    server = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{protocol} server did not start") from None
                time.sleep(0.1)
        run_wrk(url, 2, connections, None)  # warm-up
        results = {}
        for name, lua in (("get", None), ("post_1k", script)):
            before = cpu_seconds(server.pid)
            result = run_wrk(url, seconds, connections, lua)
            result["server_cpu"] = (cpu_seconds(server.pid) - before) / seconds
            results[name] = result
        return results
    finally:
        server.terminate()
        server.wait(timeout=30)


def summarise(results: list[dict[str, float]]) -> dict[str, float]:
    """Medians over rounds; requests per CPU-second of the server is what other load on the machine moves least."""
    return {
        "req_s_median": round(statistics.median(r["req_s"] for r in results)),
        "req_per_cpu_s_median": round(statistics.median(r["req_s"] / r["server_cpu"] for r in results)),
        "p99_ms_median": round(statistics.median(r["p99_ms"] for r in results), 2),
        "non_2xx": sum(r["non_2xx"] for r in results),
        "server_cpu_max": round(max(r["server_cpu"] for r in results), 2),
        "wrk_cpu_max": round(max(r["wrk_cpu"] for r in results), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    srv = sub.add_parser("serve", help="(internal) one server")
    srv.add_argument("protocol", choices=PROTOCOLS)
    srv.add_argument("port", type=int)
    fd = sub.add_parser("feed", help="(internal) requests fed to one protocol without sockets")
    fd.add_argument("protocol", choices=PROTOCOLS)
    fd.add_argument("kind", choices=list(REQUESTS))
    fd.add_argument("count", type=int)
    parser.add_argument("--instructions", action="store_true", help="count instructions per request (valgrind)")
    parser.add_argument("--requests", type=int, default=5000, help="requests per protocol for --instructions")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.protocol, args.port)
        return
    if args.command == "feed":
        feed(args.protocol, args.kind, args.count)
        return
    if args.instructions:
        print(json.dumps(count_instructions(args.requests), indent=2))
        return
    runs: dict[str, dict[str, list[dict[str, float]]]] = {p: {"get": [], "post_1k": []} for p in PROTOCOLS}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(POST_LUA)
        for _ in range(args.rounds):
            for protocol in PROTOCOLS:
                for kind, result in measure(protocol, args.seconds, args.connections, script).items():
                    runs[protocol][kind].append(result)
    summary = {
        protocol: {kind: summarise(results) for kind, results in kinds.items()} for protocol, kinds in runs.items()
    }
    for protocol in PROTOCOLS:
        for kind, figures in summary[protocol].items():
            stock = summary["httptools"][kind]
            figures["req_s_vs_stock"] = round(figures["req_s_median"] / stock["req_s_median"], 3)
            figures["req_per_cpu_s_vs_stock"] = round(
                figures["req_per_cpu_s_median"] / stock["req_per_cpu_s_median"], 3
            )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
