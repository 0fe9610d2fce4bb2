"""The gateway app factory: `create_app(settings)` and the lifespan that owns every resource."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import signal
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from starlette.middleware import Middleware

from serve.config.gateway import GatewaySettings
from serve.gateway.drain import Drain
from serve.gateway.errors import install_error_handlers
from serve.gateway.keystore import KeyStore
from serve.gateway.limits import create_limiter
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.middleware import AuthMiddleware, HeaderLimitMiddleware, MetricsMiddleware, RequestIdMiddleware
from serve.gateway.pool import EndpointPool, HealthChecker
from serve.gateway.proxy import Upstream
from serve.gateway.routes import GatewayState, ModelState, router
from serve.gateway.tokens import TokenCounter

log = logging.getLogger(__name__)

KEYS_RELOAD_INTERVAL = 2.0


def http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        # Engine traffic carries the engine key and prompts: never through an HTTP(S)_PROXY from the environment.
        trust_env=False,
        # Every request passes its model's own timeouts; this default only bounds what slips through.
        timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=10.0),
        # Every in-flight stream holds a connection; the pool must not be what queues requests.
        limits=httpx.Limits(max_connections=4096, max_keepalive_connections=512),
        follow_redirects=False,
    )


async def reload_keys(keystore: KeyStore) -> None:
    while True:
        await asyncio.sleep(KEYS_RELOAD_INTERVAL)
        keystore.reload_if_changed()


def document_models(app: FastAPI, names: list[str]) -> None:
    """The OpenAPI document names the bearer scheme and the models this gateway serves."""
    schema = app.openapi()
    schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path in ("/v1/chat/completions", "/v1/completions"):
        operation = schema["paths"][path]["post"]
        # A copy: the route's openapi_extra is shared by every app built in this process.
        operation["requestBody"] = copy.deepcopy(operation["requestBody"])
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        body["properties"]["model"] = {"type": "string", "enum": names}


def create_app(settings: GatewaySettings, drain: Drain | None = None) -> FastAPI:
    metrics = GatewayMetrics()
    keystore = KeyStore(settings.keys_path)
    drain = drain or Drain(settings.file.drain_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, GatewayState]]:
        models: dict[str, ModelState] = {}
        pools: list[EndpointPool] = []
        for route in settings.routes:
            policy = route.model.policy
            pool = EndpointPool.of(route.model.name, route.endpoints, policy.routing, route.model.discovery)
            counter = TokenCounter(route.tokenizer, policy.routing.prefix_tokens)
            if not counter.exact:
                log.warning("no tokenizer for %s: prompt tokens are estimated from length", route.model.name)
            pools.append(pool)
            entry = ModelState(model=route.model, pool=pool, counter=counter)
            models.update(dict.fromkeys(route.model.names, entry))
        limiter = create_limiter(settings.file.limits)
        async with http_client() as client, contextlib.AsyncExitStack() as resources:
            resources.push_async_callback(limiter.aclose)
            checker = HealthChecker(pools, client, settings.file.health_interval, metrics)
            await checker.check_all()
            state = GatewayState(
                models=models,
                pools=pools,
                upstream=Upstream(client=client, engine_key=settings.engine_key, checker=checker, metrics=metrics),
                keystore=keystore,
                metrics=metrics,
                drain=drain,
                limiter=limiter,
                max_body_bytes=settings.file.max_body_bytes,
                created=int(time.time()),
            )
            # SIGHUP re-reads the keys file at once, whether or not its timestamp moved.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, keystore.reload_if_changed, True)
            tasks = [
                asyncio.create_task(checker.run()),
                asyncio.create_task(reload_keys(keystore)),
                asyncio.create_task(drain.watch()),
            ]
            try:
                yield {"gateway": state}
            finally:
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(
        title="llmserve gateway",
        lifespan=lifespan,
        middleware=[
            Middleware(HeaderLimitMiddleware, max_bytes=settings.file.max_header_bytes),
            Middleware(RequestIdMiddleware),
            Middleware(MetricsMiddleware, metrics=metrics, drain=drain),
            Middleware(AuthMiddleware, keystore=keystore),
        ],
    )
    install_error_handlers(app)
    app.include_router(router)
    document_models(app, sorted(name for route in settings.routes for name in route.model.names))
    return app
