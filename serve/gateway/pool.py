"""Engine endpoints per model: health state, outstanding requests and the least-outstanding choice."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from serve.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)


@dataclass
class Endpoint:
    url: str
    healthy: bool = False
    outstanding: int = 0


@dataclass
class EndpointPool:
    model: str
    endpoints: list[Endpoint] = field(default_factory=list)

    @classmethod
    def of(cls, model: str, urls: tuple[str, ...]) -> EndpointPool:
        return cls(model=model, endpoints=[Endpoint(url=url) for url in urls])

    @property
    def ready(self) -> bool:
        return any(ep.healthy for ep in self.endpoints)

    def choose(self) -> Endpoint | None:
        """The healthy endpoint with the fewest requests in flight (first listed on a tie)."""
        healthy = [ep for ep in self.endpoints if ep.healthy]
        return min(healthy, key=lambda ep: ep.outstanding) if healthy else None

    @contextmanager
    def track(self, endpoint: Endpoint) -> Iterator[None]:
        endpoint.outstanding += 1
        try:
            yield
        finally:
            endpoint.outstanding -= 1


class HealthChecker:
    """Polls each engine's /health; a connect failure seen by the proxy marks an endpoint down at once."""

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
        self.metrics.endpoint_up.labels(pool.model, endpoint.url).set(1 if healthy else 0)

    async def probe(self, pool: EndpointPool, endpoint: Endpoint) -> None:
        try:
            resp = await self.client.get(f"{endpoint.url}/health", timeout=min(self.interval, 5.0))
            healthy = resp.status_code == 200
        except httpx.HTTPError:
            healthy = False
        self.mark(pool, endpoint, healthy)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.probe(pool, ep) for pool in self.pools for ep in pool.endpoints))

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)
