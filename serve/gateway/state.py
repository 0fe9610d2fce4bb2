"""What the lifespan owns and hands to every handler: the models, their pools, the engine client, limits, metrics."""

from __future__ import annotations

from dataclasses import dataclass

from serve.config.model_file import ModelFile
from serve.gateway.drain import Drain
from serve.gateway.keystore import KeyStore
from serve.gateway.limits import Limiter
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.pool import EndpointPool
from serve.gateway.proxy import Upstream
from serve.gateway.tokens import TokenCounter


@dataclass(slots=True)
class ModelState:
    model: ModelFile
    pool: EndpointPool
    counter: TokenCounter


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

    @property
    def inflight(self) -> int:
        """Requests holding an endpoint, across every model: what the drain waits for."""
        return sum(pool.inflight for pool in self.pools)
