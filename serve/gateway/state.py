"""What the lifespan owns and hands to every handler: the models, their pools, the engine client, limits, metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from serve.config.model_file import ModelFile
from serve.gateway.context import ClientWatch
from serve.gateway.drain import Drain
from serve.gateway.keystore import KeyStore
from serve.gateway.limits import Limiter
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.pool import EndpointPool
from serve.gateway.proxy import Upstream
from serve.gateway.scheduler import Scheduler
from serve.gateway.tokens import TokenCounter

# Two keep both cores busy without letting a burst of 4 MiB bodies multiply the gateway's memory.
LARGE_BODIES_AT_ONCE = 2


@dataclass(slots=True)
class ModelState:
    model: ModelFile
    pool: EndpointPool
    counter: TokenCounter
    # The model's queue (policy.scheduling.enabled), else None: requests go to an engine at once.
    scheduler: Scheduler | None = None


@dataclass(slots=True)
class GatewayState:
    # Served names and aliases -> the model's state (aliases share one entry).
    models: dict[str, ModelState]
    pools: list[EndpointPool]
    upstream: Upstream
    keystore: KeyStore
    metrics: GatewayMetrics
    drain: Drain
    limiter: Limiter
    max_body_bytes: int
    created: int
    # The OpenAPI document, rendered once.
    openapi: bytes
    # The bearer key /metrics asks for; None: loopback clients only.
    metrics_key: str | None = None
    # Notices clients that leave before their answer (one timer for every request).
    client_watch: ClientWatch = field(default_factory=ClientWatch)
    # Large bodies in preparation at once (parsed, checked and serialised off the loop).
    large_bodies: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(LARGE_BODIES_AT_ONCE))

    @property
    def inflight(self) -> int:
        """Requests holding an endpoint, across every model: what the drain waits for."""
        return sum(pool.inflight for pool in self.pools)
