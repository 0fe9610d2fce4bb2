"""The gateway's instructions per request under callgrind: a cost figure the machine's other work cannot move.

Wall-clock rates on a shared machine move with whatever else runs; instructions executed do not. Each gateway tree
runs under valgrind's callgrind (Debian package `valgrind`) with instrumentation off until the measured windows:
`callgrind_control` zeroes the counters, a fixed number of requests goes through one keep-alive connection, and a
dump gives what the gateway executed meanwhile. An idle window of the same length is measured too and taken off
(timers and health checks run whether or not requests come). User-space instructions only: system calls count
once each as the instruction that enters the kernel, not what the kernel does.

    llmserve bench gateway --instructions 400 --gateway-src ../before --gateway-src .
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests.gateway_bench_client import Session, check_exchange, request_bytes
from loadtests.gateway_bench_procs import (
    ROOT,
    Processes,
    Target,
    default_tokenizer,
    free_port,
    gateway_target,
    stop_all,
    wait_ready,
)

# Under callgrind a Python process starts 20-50 times slower than on its own.
START_TIMEOUT = 900.0
WARM_REQUESTS = 30
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def missing_tools() -> str | None:
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: apt-get install valgrind"
    return None


def control(pid: int, *flags: str) -> None:
    subprocess.run(["callgrind_control", *flags, str(pid)], check=True, capture_output=True, timeout=120)


def dumped(out_prefix: Path, before: set[Path]) -> int:
    """Instructions in the dump callgrind wrote since `before` was listed."""
    deadline = time.monotonic() + 60
    while True:
        new = sorted(set(out_prefix.parent.glob(out_prefix.name + "*")) - before, key=lambda p: p.stat().st_mtime)
        if new:
            found = _TOTALS.search(new[-1].read_text(errors="replace"))
            if found is not None:
                return int(found.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError(f"callgrind wrote no dump under {out_prefix}*")
        time.sleep(0.2)


def window(pid: int, out_prefix: Path, run: Callable[[], object]) -> tuple[int, float]:
    """Instructions the gateway executed while `run()` ran, and how long that took."""
    before = set(out_prefix.parent.glob(out_prefix.name + "*"))
    control(pid, "--zero")
    control(pid, "--instr=on")
    started = time.monotonic()
    run()
    elapsed = time.monotonic() - started
    control(pid, "--dump")
    control(pid, "--instr=off")
    return dumped(out_prefix, before), elapsed


def exchanges(gw: Target, session: Session, count: int, stream: bool, events: int) -> None:
    for _ in range(count):
        check_exchange(gw.name, session.exchange(), stream=stream, events=events)


def measure_gateway(gw: Target, out_prefix: Path, bodies: dict[str, bytes], count: int, events: int) -> dict[str, Any]:
    assert gw.proc is not None
    pid = gw.proc.pid
    result: dict[str, Any] = {}
    for kind, body in bodies.items():
        stream = kind == "stream"
        session = Session(gw.url, request_bytes(gw.url, body, gw.key))
        try:
            exchanges(gw, session, WARM_REQUESTS, stream, events)
            busy, seconds = window(pid, out_prefix, functools.partial(exchanges, gw, session, count, stream, events))
            idle, _ = window(pid, out_prefix, functools.partial(time.sleep, seconds))
        finally:
            session.close()
        result[kind] = {
            "requests": count,
            "instructions": busy,
            "idle_instructions": idle,
            "per_request": round((busy - idle) / count),
            "seconds": round(seconds, 2),
        }
        print(f"bench gateway: {gw.name} {kind}: {result[kind]['per_request']:,} instructions a request", flush=True)
    return result


def run_instructions(
    args: argparse.Namespace, folder: Path, sources: list[Path], model: str, bodies: dict[str, bytes]
) -> dict[str, Any]:
    """Every tree's gateway under callgrind in turn, in front of one instant upstream (not instrumented); `bodies`
    holds the plain and the streamed request."""
    tokenizer = (args.tokenizer or default_tokenizer()).resolve()
    port = free_port()
    upstream = Target("direct", f"http://127.0.0.1:{port}", folder / "upstream.log")
    argv = [sys.executable, "-m", "loadtests.instant_upstream", "--port", str(port), "--model", model]
    argv += ["--events", str(args.events), "--server", args.upstream]
    procs = Processes(upstream)
    results: dict[str, Any] = {}
    taken: set[str] = set()
    try:
        with (folder / "upstream.log").open("wb") as err:
            upstream.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        wait_ready(upstream, "/health")
        for src in sources:
            gw, cmd, env = gateway_target(folder, src, upstream.url, tokenizer, taken)
            out_prefix = folder / f"callgrind-{gw.name}.out"
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_prefix}", *cmd]
            print(f"bench gateway: starting {gw.name} under callgrind (slow) ...", flush=True)
            with gw.log.open("wb") as err:
                gw.proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=err)
            procs.gateways.append(gw)
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    wait_ready(gw, "/readyz")
                    break
                except RuntimeError:
                    if gw.proc.poll() is not None or time.monotonic() > deadline:
                        raise
            results[gw.name] = measure_gateway(gw, out_prefix, bodies, args.instructions, args.events)
            gw.proc.terminate()
            gw.proc.wait(timeout=120)
    finally:
        stop_all(procs)
    return results


def instructions_table(results: dict[str, Any]) -> str:
    names = list(results)
    lines = ["gateway       kind        instructions/request   vs first"]
    for kind in ("plain", "stream"):
        first = results[names[0]][kind]["per_request"]
        for name in names:
            per = results[name][kind]["per_request"]
            lines.append(f"{name:<13} {kind:<10} {per:>20,}   {per / first:>7.3f}x")
    return "\n".join(lines)
