"""The health-check loop outlives any one failure: a broken endpoint URL must not end checking for the others."""

from __future__ import annotations

import asyncio

import httpx

from serve.config.model_file import Routing
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.pool import EndpointPool, HealthChecker
from tests.integration.fake_engine import FakeEngine
from tests.servers import run_server


def test_an_unusable_endpoint_url_does_not_stop_health_checks() -> None:
    engine = FakeEngine()
    with run_server(engine.app()) as url:

        async def scenario() -> tuple[bool, bool, bool]:
            # A URL httpx cannot even build a request for (as a bad DNS answer could produce).
            broken = EndpointPool.of("broken", ("http://[zz]:80",), Routing())
            good = EndpointPool.of("good", (url,), Routing())
            metrics = GatewayMetrics()
            async with httpx.AsyncClient() as client:
                checker = HealthChecker([broken, good], client, interval=0.05, metrics=metrics)
                loop = asyncio.create_task(checker.run())
                await asyncio.sleep(0.5)
                up_first = good.endpoints[0].healthy
                engine.healthy = False
                await asyncio.sleep(0.5)
                down_later = not good.endpoints[0].healthy
                alive = not loop.done()
                loop.cancel()
            return up_first, down_later, alive

        up_first, down_later, alive = asyncio.run(scenario())
    assert up_first, "the healthy engine was never marked up"
    assert alive, "the health-check loop died"
    assert down_later, "a later change of the healthy engine was not noticed"
