"""The gateway app: `create_app(settings)` gives a pure ASGI app whose lifespan owns every resource.

Each request enters through `Gateway.handle`, which makes its context, runs the stages (request id -> metrics ->
header limit -> auth) and the route, renders any error as the OpenAI envelope, then closes everything the request
took in one place and records it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import time
from typing import Any

import httpx

from serve.config.gateway import GatewaySettings
from serve.gateway.asgi import Receive, Scope, Send, header, send_error
from serve.gateway.context import CONTEXT, RequestContext
from serve.gateway.drain import Drain
from serve.gateway.engine_client import EngineHttpClient
from serve.gateway.errors import ClientClosed, GatewayError, InternalError, MethodNotAllowed, NotFound
from serve.gateway.keystore import KeyStore
from serve.gateway.limits import create_limiter
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.middleware import authenticate, check_head, client_request_id, new_request_id, record
from serve.gateway.pool import EndpointPool, HealthChecker
from serve.gateway.protocol import openapi_document
from serve.gateway.proxy import Upstream
from serve.gateway.routes import route_table
from serve.gateway.scheduler import Scheduler
from serve.gateway.state import GatewayState, ModelState
from serve.gateway.tokens import TokenCounter
from serve.logs import request_id_var

log = logging.getLogger(__name__)

KEYS_RELOAD_INTERVAL = 2.0


def health_client() -> httpx.AsyncClient:
    """For health checks (a few requests a second; engine requests go through serve.gateway.engine_client)."""
    return httpx.AsyncClient(
        # Engine traffic carries the engine key: never through an HTTP(S)_PROXY from the environment.
        trust_env=False,
        timeout=httpx.Timeout(connect=5.0, read=10.0, write=5.0, pool=5.0),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        follow_redirects=False,
    )


async def reload_keys(keystore: KeyStore) -> None:
    while True:
        await asyncio.sleep(KEYS_RELOAD_INTERVAL)
        await keystore.areload_if_changed()


class Gateway:
    """The ASGI app. `state` exists between lifespan startup and shutdown."""

    def __init__(self, settings: GatewaySettings, drain: Drain) -> None:
        self.settings = settings
        self.drain = drain
        self.metrics = GatewayMetrics()
        self.keystore = KeyStore(settings.keys_path, on_reload_error=self.metrics.keys_reload_errors.inc)
        self.routes = route_table(settings.file.openapi)
        self.max_header_bytes = settings.file.max_header_bytes
        self.state: GatewayState | None = None
        self._resources = contextlib.AsyncExitStack()
        self._background: set[asyncio.Future[bool]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.handle(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        path: str = scope["path"]
        route = self.routes.get(path)
        client = scope.get("client")
        ctx = RequestContext(
            id=new_request_id(),
            start=start,
            route=route.label if route is not None else "other",
            client=client[0] if client else None,
            client_request_id=client_request_id(header(scope, b"x-request-id")),
        )
        scope[CONTEXT] = ctx
        token = request_id_var.set(ctx.id)
        api = path.startswith("/v1/")
        try:
            try:
                check_head(scope, self.max_header_bytes)
                if path.startswith("/v1"):
                    ctx.key = authenticate(header(scope, b"authorization"), self.keystore)
                if route is None:
                    raise NotFound(f"no route {path}", code="route_not_found")
                handler = route.methods.get(scope["method"])
                if handler is None:
                    raise MethodNotAllowed(f"{scope['method']} is not allowed on {path}")
                assert self.state is not None
                await handler(self.state, ctx, scope, receive, send)
            except asyncio.CancelledError:
                if not ctx.client_gone:
                    raise
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()
                self.client_left(ctx)
            except ClientClosed:
                self.client_left(ctx)
            except GatewayError as exc:
                if not ctx.status:  # nothing sent yet: the error is the answer
                    await send_error(ctx, send, exc)
            except Exception:
                log.exception("unexpected error")
                if not ctx.status:
                    await send_error(ctx, send, InternalError("internal error in the gateway"))
            finally:
                await ctx.resources.aclose()
        finally:
            if not ctx.status:
                ctx.status = 500  # cancelled by a shutdown before any answer
            record(ctx, self.metrics, scope["method"], api)
            request_id_var.reset(token)

    def client_left(self, ctx: RequestContext) -> None:
        if not ctx.status:
            ctx.status = ClientClosed.status
        log.info("client disconnected; engine request closed")
        self.metrics.errors.labels(ctx.model, "client_disconnected").inc()

    async def lifespan(self, receive: Receive, send: Send) -> None:
        await receive()
        try:
            await self.startup()
        except Exception as exc:
            log.exception("gateway startup failed")
            await self._resources.aclose()
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await self._resources.aclose()
        self.state = None
        await send({"type": "lifespan.shutdown.complete"})

    async def startup(self) -> None:
        settings, res = self.settings, self._resources
        models: dict[str, ModelState] = {}
        pools: list[EndpointPool] = []
        schedulers: list[Scheduler] = []
        for route in settings.routes:
            policy = route.model.policy
            pool = EndpointPool.of(route.model.name, route.endpoints, policy.routing, route.model.discovery)
            counter = TokenCounter(route.tokenizer, policy.routing.prefix_tokens)
            if not counter.exact:
                log.warning("no tokenizer for %s: prompt tokens are estimated from length", route.model.name)
            pools.append(pool)
            scheduler = None
            if policy.scheduling.enabled:
                scheduler = Scheduler(pool, policy.scheduling, route.model.engine.max_num_seqs)
                pool.watch_queue = True
                schedulers.append(scheduler)
            entry = ModelState(model=route.model, pool=pool, counter=counter, scheduler=scheduler)
            models.update(dict.fromkeys(route.model.names, entry))
        client = await res.enter_async_context(health_client())
        engines = EngineHttpClient()
        res.push_async_callback(engines.aclose)
        limiter = create_limiter(settings.file.limits)
        res.push_async_callback(limiter.aclose)
        checker = HealthChecker(pools, client, settings.file.health_interval, self.metrics)
        await checker.check_all()
        names = sorted(name for route in settings.routes for name in route.model.names)
        state = GatewayState(
            models=models,
            pools=pools,
            upstream=Upstream(
                client=engines,
                engine_key=settings.engine_key,
                metrics=self.metrics,
                max_event_bytes=settings.file.max_event_bytes,
            ),
            keystore=self.keystore,
            metrics=self.metrics,
            drain=self.drain,
            limiter=limiter,
            max_body_bytes=settings.file.max_body_bytes,
            created=int(time.time()),
            openapi=json.dumps(openapi_document(names)).encode(),
            metrics_key=settings.metrics_key,
        )
        self.metrics.watch_pools(lambda: state.pools, lambda: schedulers)

        def refuse_queued() -> None:
            for scheduler in schedulers:
                scheduler.refuse_all()

        self.drain.on_begin = refuse_queued
        self.drain.inflight = lambda: state.inflight
        loop = asyncio.get_running_loop()
        # SIGHUP re-reads the keys file at once, whether or not it looks changed.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._reload_now)
            res.callback(_remove_sighup, loop)
        for job in (checker.run(), reload_keys(self.keystore), self.drain.watch(), state.client_watch.run()):
            task = asyncio.create_task(job)
            res.push_async_callback(_cancel, task)
        self.state = state
        # What startup built lives as long as the process: out of the collector's sight, full collections stay
        # short instead of walking it all again (each one a pause of every stream on the loop).
        gc.collect()
        gc.freeze()

    def _reload_now(self) -> None:
        """SIGHUP: re-read the keys file at once, whether or not it looks changed (parsed off the loop)."""
        task = asyncio.ensure_future(self.keystore.areload_if_changed(True))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _remove_sighup(loop: asyncio.AbstractEventLoop) -> None:
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.remove_signal_handler(signal.SIGHUP)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(settings: GatewaySettings, drain: Drain | None = None) -> Gateway:
    return Gateway(settings, drain or Drain(settings.file.drain_timeout))
