"""Engine endpoints per model: health, ejection, outstanding requests, and the routing choice."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
from dataclasses import dataclass, field

import httpx

from serve.config.model_file import DnsDiscovery, Routing
from serve.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)


@dataclass
class Endpoint:
    url: str
    healthy: bool = False
    outstanding: int = 0
    # Consecutive failures seen by the proxy; reset by a success or a passed health check.
    failures: int = 0


def rendezvous(key: str, endpoints: list[Endpoint]) -> Endpoint:
    """Highest-random-weight hashing: a key keeps its endpoint while that endpoint stays in the list."""
    return max(endpoints, key=lambda ep: hashlib.blake2b(f"{key}|{ep.url}".encode(), digest_size=8).digest())


@dataclass
class EndpointPool:
    model: str
    routing: Routing = field(default_factory=Routing)
    endpoints: list[Endpoint] = field(default_factory=list)
    discovery: DnsDiscovery | None = None
    # Requests admitted for this model and not finished (what max_inflight caps).
    admitted: int = 0

    @classmethod
    def of(
        cls, model: str, urls: tuple[str, ...], routing: Routing | None = None, discovery: DnsDiscovery | None = None
    ) -> EndpointPool:
        return cls(model, routing or Routing(), [Endpoint(url=url) for url in urls], discovery)

    @property
    def ready(self) -> bool:
        return any(ep.healthy for ep in self.endpoints)

    @property
    def outstanding(self) -> int:
        return sum(ep.outstanding for ep in self.endpoints)

    def choose(self, affinity: str | None = None, exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        """An affinity key picks by rendezvous hash; otherwise the healthy endpoint with the fewest in flight."""
        healthy = [ep for ep in self.endpoints if ep.healthy and ep.url not in exclude]
        if not healthy:
            return None
        if affinity is not None:
            return rendezvous(affinity, healthy)
        return min(healthy, key=lambda ep: ep.outstanding)

    def set_urls(self, urls: list[str]) -> None:
        """Replace the endpoint list (DNS discovery), keeping the state of endpoints that remain."""
        known = {ep.url: ep for ep in self.endpoints}
        self.endpoints = [known.get(url) or Endpoint(url=url) for url in urls]


class HealthChecker:
    """Active checks of each engine's health path, passive ejection after consecutive failures, DNS refresh."""

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
        endpoint.healthy = healthy
        if healthy:
            endpoint.failures = 0
        self.metrics.endpoint_up.labels(pool.model, endpoint.url).set(1 if healthy else 0)

    def failed(self, pool: EndpointPool, endpoint: Endpoint, reason: str) -> None:
        endpoint.failures += 1
        if endpoint.healthy and endpoint.failures >= pool.routing.eject_after:
            log.warning("ejecting %s of %s after %d failures (%s)", endpoint.url, pool.model, endpoint.failures, reason)
            self.metrics.ejections.labels(pool.model).inc()
            self.mark(pool, endpoint, healthy=False)

    def succeeded(self, endpoint: Endpoint) -> None:
        endpoint.failures = 0

    async def probe(self, pool: EndpointPool, endpoint: Endpoint) -> None:
        try:
            resp = await self.client.get(f"{endpoint.url}{pool.routing.health_path}", timeout=min(self.interval, 5.0))
            healthy = resp.status_code == 200
        except httpx.HTTPError:
            healthy = False
        self.mark(pool, endpoint, healthy)

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
            gone = [ep for ep in pool.endpoints if ep.url not in urls]
            pool.set_urls(urls)
            # A gone pod's series would otherwise live on (an "up" one would even mask an engine-down alert).
            for ep in gone:
                with contextlib.suppress(KeyError):
                    self.metrics.endpoint_up.remove(pool.model, ep.url)
                if ep.outstanding == 0:
                    with contextlib.suppress(KeyError):
                        self.metrics.inflight.remove(pool.model, ep.url)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.resolve(pool) for pool in self.pools))
        await asyncio.gather(*(self.probe(pool, ep) for pool in self.pools for ep in pool.endpoints))

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)
