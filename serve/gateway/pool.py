"""Engine endpoints per model: leases (the one count of requests in flight), health, ejection, the routing choice."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from serve.config.model_file import DnsDiscovery, Routing
from serve.gateway.errors import Unavailable
from serve.gateway.metrics import GatewayMetrics
from serve.protocol.metrics_text import series_sums

log = logging.getLogger(__name__)

LOAD_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


@dataclass(eq=False)
class Endpoint:
    url: str
    healthy: bool = False
    # Leases held on this endpoint: the only count of requests in flight.
    outstanding: int = 0
    # Consecutive failures seen by the proxy, and the API keys whose requests failed in that run; reset by a
    # success or a passed health check.
    failures: int = 0
    failing_keys: set[str] = field(default_factory=set)
    connect_failures: int = 0
    # The engine's own load at the last health check (when the pool watches it): requests it runs and has waiting
    # (vllm:num_requests_running / _waiting) and the share of its KV cache in use (vllm:kv_cache_usage_perc).
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0

    def reset(self) -> None:
        self.failures = self.connect_failures = 0
        self.failing_keys.clear()


def rendezvous(key: str, endpoints: list[Endpoint]) -> Endpoint:
    """Highest-random-weight hashing: a key keeps its endpoint while that endpoint stays in the list."""
    return max(endpoints, key=lambda ep: hashlib.blake2b(f"{key}|{ep.url}".encode(), digest_size=8).digest())


class Lease:
    """One request's hold on one endpoint of a pool; `move` re-routes it (a retry), the pool's `lease` ends it."""

    __slots__ = ("pool", "endpoint", "affinity", "tried")

    def __init__(self, pool: EndpointPool, endpoint: Endpoint, affinity: str | None) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.affinity = affinity
        self.tried = [endpoint.url]
        endpoint.outstanding += 1

    def move(self) -> bool:
        """Hold another healthy endpoint instead, one not tried yet; False (holding the old one) if there is none."""
        other = self.pool.choose(self.affinity, exclude=frozenset(self.tried))
        if other is None:
            return False
        self.endpoint.outstanding -= 1
        self.endpoint = other
        self.tried.append(other.url)
        other.outstanding += 1
        return True

    def succeeded(self) -> None:
        if self.endpoint.failures:
            self.endpoint.reset()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.endpoint.outstanding -= 1
        if self.pool.on_change is not None:
            self.pool.on_change()

    def failed(self, key_id: str, connect: bool = False) -> bool:
        """Count a failure of this endpoint for a request of this key; True when it ejected the endpoint."""
        return self.pool.record_failure(self.endpoint, key_id, connect)


@dataclass(eq=False)
class EndpointPool:
    model: str
    routing: Routing = field(default_factory=Routing)
    endpoints: list[Endpoint] = field(default_factory=list)
    discovery: DnsDiscovery | None = None
    # Called when a place may have freed (a lease ended, a health check ran): the model's scheduler, if any.
    on_change: Callable[[], None] | None = None
    # Read each engine's load (Endpoint.running, waiting, kv_usage) at every health check: the scheduler's signal.
    watch_queue: bool = False

    @classmethod
    def of(
        cls, model: str, urls: tuple[str, ...], routing: Routing | None = None, discovery: DnsDiscovery | None = None
    ) -> EndpointPool:
        return cls(model, routing or Routing(), [Endpoint(url=url) for url in urls], discovery)

    @property
    def ready(self) -> bool:
        return any(ep.healthy for ep in self.endpoints)

    @property
    def inflight(self) -> int:
        return sum(ep.outstanding for ep in self.endpoints)

    def choose(self, affinity: str | None = None, exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        """An affinity key picks by rendezvous hash; otherwise the healthy endpoint with the fewest in flight."""
        healthy = [ep for ep in self.endpoints if ep.healthy and ep.url not in exclude]
        if not healthy:
            return None
        if affinity is not None:
            return rendezvous(affinity, healthy)
        return min(healthy, key=lambda ep: ep.outstanding)

    def lease(self, affinity: str | None = None) -> Lease:
        """Hold a place on an endpoint for one request until the lease is exited; 503 before anything is spent
        when none can take it. The check and the taking have no await between them, so a burst cannot overshoot
        `max_inflight`."""
        self.check_cap()
        endpoint = self.choose(affinity)
        if endpoint is None:
            raise Unavailable(f"no healthy engine for model {self.model!r}", headers={"retry-after": "1"})
        return Lease(self, endpoint, affinity)

    def check_cap(self) -> None:
        """503 when the model is at routing.max_inflight (a hard cap, whatever any queue would do)."""
        cap = self.routing.max_inflight
        if cap is not None and self.inflight >= cap:
            raise Unavailable(
                f"model {self.model!r} is at its limit of {cap} requests in flight",
                code="overloaded",
                headers={"retry-after": "1"},
            )

    def record_failure(self, endpoint: Endpoint, key_id: str, connect: bool) -> bool:
        """Eject on what belongs to the engine: connect errors, or failures seen by several keys."""
        endpoint.failures += 1
        endpoint.failing_keys.add(key_id)
        if connect:
            endpoint.connect_failures += 1
        routing = self.routing
        engine_fault = endpoint.connect_failures >= routing.eject_after or (
            endpoint.failures >= routing.eject_after and len(endpoint.failing_keys) >= routing.eject_min_keys
        )
        if endpoint.healthy and engine_fault:
            log.warning(
                "ejecting %s of %s after %d failures (%d keys)",
                endpoint.url,
                self.model,
                endpoint.failures,
                len(endpoint.failing_keys),
            )
            endpoint.healthy = False
            return True
        return False

    def set_urls(self, urls: list[str]) -> None:
        """Replace the endpoint list (DNS discovery), keeping the state of endpoints that remain.

        A lease on an endpoint that went keeps it alive until the request ends; it is just no longer chosen.
        """
        known = {ep.url: ep for ep in self.endpoints}
        self.endpoints = [known.get(url) or Endpoint(url=url) for url in urls]


class HealthChecker:
    """Active checks of each engine's health path, and DNS refresh; the loop outlives any one failure."""

    def __init__(
        self, pools: list[EndpointPool], client: httpx.AsyncClient, interval: float, metrics: GatewayMetrics
    ) -> None:
        self.pools = pools
        self.client = client
        self.interval = interval
        self.metrics = metrics

    def mark(self, pool: EndpointPool, endpoint: Endpoint, healthy: bool) -> None:
        if endpoint.healthy != healthy:
            log.info("endpoint %s of %s is now %s", endpoint.url, pool.model, "up" if healthy else "down")
        if healthy and not endpoint.healthy:
            # Back in: a clean slate. A check that merely passes does not wipe a run of request failures.
            endpoint.reset()
        endpoint.healthy = healthy

    async def probe(self, pool: EndpointPool, endpoint: Endpoint) -> None:
        try:
            resp = await self.client.get(f"{endpoint.url}{pool.routing.health_path}", timeout=min(self.interval, 5.0))
            healthy = resp.status_code == 200
            if healthy and pool.watch_queue:
                await self.read_load(endpoint)
        except httpx.HTTPError:
            healthy = False
        except Exception as exc:  # an invalid URL from a DNS answer, say: the endpoint is down, checking goes on
            log.warning("health check of %s failed: %s", endpoint.url, type(exc).__name__)
            self.metrics.health_check_errors.inc()
            healthy = False
        self.mark(pool, endpoint, healthy)

    async def read_load(self, endpoint: Endpoint) -> None:
        """The engine's running and waiting requests and KV cache use, from its metrics (summed over its series);
        zero when they cannot be read."""
        load = dict.fromkeys(LOAD_GAUGES, 0.0)
        try:
            resp = await self.client.get(f"{endpoint.url}/metrics", timeout=min(self.interval, 5.0))
        except httpx.HTTPError:
            resp = None
        if resp is not None and resp.status_code == 200:
            load.update(series_sums(resp.text, LOAD_GAUGES))
        endpoint.running = int(load["vllm:num_requests_running"])
        endpoint.waiting = int(load["vllm:num_requests_waiting"])
        endpoint.kv_usage = load["vllm:kv_cache_usage_perc"]

    async def resolve(self, pool: EndpointPool) -> None:
        d = pool.discovery
        if d is None:
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(d.name, d.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot resolve %s for %s (keeping the last endpoints): %s", d.name, pool.model, exc)
            return
        hosts = sorted({str(info[4][0]) for info in infos})
        urls = [f"{d.scheme}://[{h}]:{d.port}" if ":" in h else f"{d.scheme}://{h}:{d.port}" for h in hosts]
        if urls != [ep.url for ep in pool.endpoints]:
            log.info("%s resolves to %s for %s", d.name, ", ".join(urls), pool.model)
            pool.set_urls(urls)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.resolve(pool) for pool in self.pools))
        await asyncio.gather(*(self.probe(pool, ep) for pool in self.pools for ep in pool.endpoints))
        for pool in self.pools:
            if pool.on_change is not None:
                pool.on_change()

    async def run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:
                # One bad round (an odd DNS answer, a bug) must not end health checking for good.
                log.exception("health check round failed")
                self.metrics.health_check_errors.inc()
            await asyncio.sleep(self.interval)
