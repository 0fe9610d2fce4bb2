"""Ray Serve for real: `up` starts a local Ray cluster on loopback, deploys SmolLM2 on vLLM CPU, routes the gateway."""

from __future__ import annotations

import ipaddress
import threading
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from openai import OpenAI

from tests.e2e.conftest import RunningStack, start_stack, stop_and_check

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

RAY_FILE = "configs/models/smollm2-135m-cpu-ray.yaml"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Measured on 2 cores with a warm vLLM compile cache: 62 s from start to clean stop, peak 6.7 GiB (summed PSS).
# A bound, so that a path gone slow (a replica never placed, an engine starved, a hung shutdown) shows.
BUDGET_SECONDS = 360


class TreeMemory:
    """Peak memory of the `up` started with `marker` in its command line and everything under it, from its start
    (Ray's processes and the engine), sampled each second. Another stack of the session is not counted.

    PSS, not RSS: Ray's workers share most of their pages (Python, torch), and summed RSS counts them again for
    each process."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.peak = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.wait(1.0):
            total = 0
            for proc in self.tree():
                try:
                    total += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)

    def tree(self) -> list[psutil.Process]:
        procs = []
        for child in psutil.Process().children():
            try:
                if self.marker in " ".join(child.cmdline()):
                    procs += [child, *child.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return procs

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def listening_outside_loopback(pids: set[int]) -> list[tuple[str, int, int]]:
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in pids:
            continue
        ip = ipaddress.ip_address(conn.laddr.ip)
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        if not (mapped or ip).is_loopback:
            found.append((conn.laddr.ip, conn.laddr.port, conn.pid))
    return found


def refuses_without_ray_token(port: int) -> bool:
    """A call to Ray Serve's inter-replica gRPC service without Ray's token is turned away."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary("/ray.serve.ASGIService/HandleRequest")(b"", timeout=10)
        except grpc.RpcError as exc:
            return bool(exc.code() == grpc.StatusCode.UNAUTHENTICATED)
    return False


def check_exposure(stack: RunningStack) -> None:
    """Everything listens on loopback, except what Ray 2.60 binds to all interfaces: each Serve replica's
    inter-replica gRPC server ("[::]:0" in its code), which token authentication guards."""
    for ip, port, pid in listening_outside_loopback({p.pid for p in stack.descendants()}):
        name = psutil.Process(pid).name()
        assert name.startswith("ray::ServeReplica"), f"{name} listens on {ip}:{port}"
        assert refuses_without_ray_token(port), f"{name} on {ip}:{port} answers without Ray's token"


def check_answers(stack: RunningStack) -> None:
    client = OpenAI(base_url=stack.v1, api_key=stack.key, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=stack.model, messages=QUESTION, temperature=0, max_tokens=30)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="smollm2-ray",
            messages=QUESTION,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3, "streamed token by token"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0


def test_ray_serve_replica_answers_through_the_gateway(tmp_path: Path, record_property: pytest.RecordProperty) -> None:
    started = time.monotonic()
    memory = TreeMemory(str(tmp_path / "ray"))
    stack = start_stack(tmp_path / "ray", RAY_FILE)
    try:
        assert stack.engine_url.startswith("http://127.0.0.1:")
        assert stack.engine_url != stack.url, "Ray Serve's port must not be the gateway's"
        names = " ".join(p.name() + " " + " ".join(p.cmdline()[:1]) for p in stack.descendants())
        assert "raylet" in names and "gcs_server" in names, "a local Ray cluster runs under `up`"
        check_exposure(stack)
        engines = [p for p in stack.descendants() if p.name().startswith("VLLM::")]
        assert engines, "the replica's vLLM engine runs under `up`"
        # Ray's default nice 15 starves the engine beside any normal-priority load.
        assert {p.nice() for p in engines} == {0}
        # The gateway keeps its own auth in front of Ray Serve.
        refused = httpx.post(f"{stack.v1}/chat/completions", json={"model": stack.model, "messages": QUESTION})
        assert refused.status_code == 401
        check_answers(stack)
    finally:
        stop_and_check(stack)
        peak = memory.stop()
        seconds = time.monotonic() - started
        record_property("duration_seconds", round(seconds, 1))
        record_property("peak_pss_bytes", peak)
        print(f"\nray serve e2e: {seconds:.0f} s, peak memory (summed PSS) {peak / 2**30:.2f} GiB")
    assert seconds < BUDGET_SECONDS
