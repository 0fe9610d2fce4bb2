"""The gateway app factory: `create_app(settings)` and the lifespan that owns every resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from starlette.middleware import Middleware

from serve.config.gateway import GatewaySettings
from serve.gateway.errors import install_error_handlers
from serve.gateway.keystore import KeyStore
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.middleware import AuthMiddleware, MetricsMiddleware, RequestIdMiddleware
from serve.gateway.pool import EndpointPool, HealthChecker
from serve.gateway.proxy import Upstream
from serve.gateway.routes import GatewayState, router

log = logging.getLogger(__name__)

KEYS_RELOAD_INTERVAL = 2.0


def http_client(settings: GatewaySettings) -> httpx.AsyncClient:
    t = settings.file.timeouts
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.read, pool=t.connect),
        # Every in-flight stream holds a connection; the pool must not be what queues requests.
        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        follow_redirects=False,
    )


async def reload_keys(keystore: KeyStore) -> None:
    while True:
        await asyncio.sleep(KEYS_RELOAD_INTERVAL)
        keystore.reload_if_changed()


def create_app(settings: GatewaySettings) -> FastAPI:
    metrics = GatewayMetrics()
    keystore = KeyStore(settings.keys_path)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, GatewayState]]:
        pools = [EndpointPool.of(route.model.name, route.endpoints) for route in settings.routes]
        by_name = {
            name: (route, pool)
            for route, pool in zip(settings.routes, pools, strict=True)
            for name in route.model.names
        }
        async with http_client(settings) as client:
            checker = HealthChecker(pools, client, settings.file.health_interval, metrics)
            await checker.check_all()
            state = GatewayState(
                routes=by_name,
                pools=pools,
                upstream=Upstream(client=client, engine_key=settings.engine_key, checker=checker, metrics=metrics),
                keystore=keystore,
                metrics=metrics,
                max_body_bytes=settings.file.max_body_bytes,
                created=int(time.time()),
            )
            tasks = [asyncio.create_task(checker.run()), asyncio.create_task(reload_keys(keystore))]
            try:
                yield {"gateway": state}
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(
        title="llmserve gateway",
        lifespan=lifespan,
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(MetricsMiddleware, metrics=metrics),
            Middleware(AuthMiddleware, keystore=keystore),
        ],
    )
    install_error_handlers(app)
    app.include_router(router)
    return app
