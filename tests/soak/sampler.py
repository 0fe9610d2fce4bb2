"""One sample a second: the gateway's RSS, fds, connections and /metrics, the engine's queue, the limiter's slots."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import RedisError

from serve.gateway.limits import RedisLimiter

INTERVAL = 1.0


@dataclass
class Sample:
    # When the sample began; what it read from the gateway's /metrics is as of `metrics_t`, when that answer came
    # (later: the descriptors are read first, and take a while on a loaded machine).
    t: float
    metrics_t: float | None = None
    rss: int | None = None
    fds: int | None = None
    # The gateway's TCP connections by peer (client, engine, redis, listen, other; "redis:CLOSE_WAIT" for ones not
    # established), and sockets it holds that are no connection any more ("dead:redis").
    conns: dict[str, int] = field(default_factory=dict)
    # Its descriptors by what they are: socket, pipe, anon_inode (epoll, eventfd), file.
    fd_kinds: dict[str, int] = field(default_factory=dict)
    # Samples in the gateway's /metrics (one per series).
    series: int | None = None
    # gateway_inflight_requests summed over endpoints: the pool's leases.
    inflight: float | None = None
    # gateway_queue_depth summed over classes: requests waiting in the gateway for an engine.
    queued: float | None = None
    endpoints_up: float | None = None
    errors: dict[str, float] = field(default_factory=dict)
    requests: dict[str, float] = field(default_factory=dict)
    # vLLM's own queue: None while the engine does not answer.
    engine_running: float | None = None
    engine_waiting: float | None = None
    # The limiter's slots per key id (`outstanding`); None while Redis does not answer.
    slots: dict[str, int] | None = None

    @property
    def slots_total(self) -> int | None:
        return None if self.slots is None else sum(self.slots.values())


@dataclass(frozen=True)
class Targets:
    gateway_pid: int
    gateway_url: str
    gateway_port: int
    engine_url: str
    redis_url: str
    key_prefix: str


def engine_port(url: str) -> int:
    return httpx.URL(url).port or 80


def descriptors(
    proc: psutil.Process, t: Targets, engine: int, redis_port: int, peers: dict[str, str]
) -> tuple[dict[str, int], dict[str, int]]:
    """The gateway's TCP connections by peer and state, and its descriptors by kind.

    "dead:PEER" counts sockets the process still holds that no socket table lists any more: TCP connections that
    ended (the peer closed, a keep-alive probe got a reset) and were never closed by their owner. Their peer is the
    one last seen for the same socket (`peers`, kept from sample to sample).
    """
    conns = {"client": 0, "engine": 0, "redis": 0, "listen": 0, "other": 0}
    listed: dict[int, str] = {}
    for c in proc.net_connections(kind="all"):
        listed[c.fd] = "unix"
        if c.type != socket.SOCK_STREAM or c.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        if c.status == psutil.CONN_LISTEN:
            conns["listen"] += 1
            continue
        peer = c.raddr.port if c.raddr else None
        if peer == engine:
            kind = "engine"
        elif peer == redis_port:
            kind = "redis"
        elif c.laddr and c.laddr.port == t.gateway_port:
            kind = "client"
        else:
            kind = "other"
        listed[c.fd] = kind
        # Open connections by peer; the others (CLOSE_WAIT: the peer closed, we did not) by peer and state.
        name = kind if c.status == psutil.CONN_ESTABLISHED else f"{kind}:{c.status}"
        conns[name] = conns.get(name, 0) + 1
    kinds: dict[str, int] = {}
    for entry in Path(f"/proc/{proc.pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue  # closed meanwhile
        kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind != "socket":
            continue
        fd = int(entry.name)
        if fd in listed:
            peers[target] = listed[fd]
        else:
            name = f"dead:{peers.get(target, 'unknown')}"
            conns[name] = conns.get(name, 0) + 1
    return conns, kinds


def read_gateway_metrics(text: str, s: Sample) -> None:
    series = 0
    s.inflight, s.queued, s.endpoints_up = 0.0, 0.0, 0.0
    for family in text_string_to_metric_families(text):
        for m in family.samples:
            series += 1
            if m.name == "gateway_inflight_requests":
                s.inflight += m.value
            elif m.name == "gateway_queue_depth":
                s.queued += m.value
            elif m.name == "gateway_endpoint_up":
                s.endpoints_up += m.value
            elif m.name == "gateway_errors_total":
                reason = m.labels.get("reason", "")
                s.errors[reason] = s.errors.get(reason, 0.0) + m.value
            elif m.name == "gateway_requests_total":
                cls = m.labels.get("status_class", "")
                s.requests[cls] = s.requests.get(cls, 0.0) + m.value
    s.series = series


def read_engine_metrics(text: str, s: Sample) -> None:
    # vLLM's exposition is large; two gauges are all the soak needs, so no full parse every second.
    running = waiting = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            running += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:num_requests_waiting"):
            waiting += float(line.rsplit(" ", 1)[1])
    s.engine_running, s.engine_waiting = running, waiting


class Sampler:
    """Samples in a thread of its own (an event loop there), every second until stopped; `now()` takes one more."""

    def __init__(self, targets: Targets, key_ids: Callable[[], list[str]], out: Path, metrics_key: str) -> None:
        self.targets = targets
        self.metrics_headers = {"authorization": f"Bearer {metrics_key}"}
        self.key_ids = key_ids
        self.out = out
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._proc = psutil.Process(targets.gateway_pid)
        self._engine_port = engine_port(targets.engine_url)
        self._redis_port = engine_port(targets.redis_url)
        # Socket (its /proc link, "socket:[inode]") -> the peer it was last seen connected to.
        self._peers: dict[str, str] = {}

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def now(self) -> Sample:
        """One sample now (kept with the others)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self._keep(), self._loop).result(timeout=30)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._one = asyncio.Lock()
        # No keep-alive: the sampler's own connections must not count among the gateway's at the end.
        self._http = httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_keepalive_connections=0), trust_env=False)
        client = aioredis.from_url(self.targets.redis_url, socket_timeout=1, socket_connect_timeout=1)
        self._limiter = RedisLimiter(client, key_prefix=self.targets.key_prefix, slot_lease=60)
        self._ready.set()
        try:
            with self.out.open("a", buffering=1) as fh:
                self._fh = fh
                while not self._stop.is_set():
                    started = time.monotonic()
                    await self._keep()
                    await asyncio.sleep(max(0.0, INTERVAL - (time.monotonic() - started)))
        finally:
            await self._http.aclose()
            await self._limiter.aclose()

    async def _keep(self) -> Sample:
        # One sample at a time: another one's request to /metrics would show up as a client connection.
        async with self._one:
            s = await self.take()
        self.samples.append(s)
        self._fh.write(json.dumps(asdict(s)) + "\n")
        return s

    async def take(self) -> Sample:
        t = self.targets
        s = Sample(t=time.time())
        with contextlib.suppress(psutil.Error, OSError):
            with self._proc.oneshot():
                s.rss = self._proc.memory_info().rss
                s.fds = self._proc.num_fds()
            s.conns, s.fd_kinds = descriptors(self._proc, t, self._engine_port, self._redis_port, self._peers)
        with contextlib.suppress(httpx.HTTPError):
            resp = await self._http.get(f"{t.gateway_url}/metrics", headers=self.metrics_headers)
            if resp.status_code == 200:
                s.metrics_t = time.time()
                read_gateway_metrics(resp.text, s)
        with contextlib.suppress(httpx.HTTPError):
            resp = await self._http.get(f"{t.engine_url}/metrics", timeout=2)
            if resp.status_code == 200:
                read_engine_metrics(resp.text, s)
        try:
            s.slots = {key_id: await self._limiter.outstanding(key_id) for key_id in self.key_ids()}
        except RedisError:
            s.slots = None
        return s
