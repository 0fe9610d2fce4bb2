"""Forwarding a prepared request to an engine: endpoint choice, retries, timeouts, status before the first byte."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from serve.config.model_file import Timeouts
from serve.gateway.errors import GatewayError, UpstreamError, UpstreamTimeout, from_status
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.policy import Prepared
from serve.gateway.pool import Endpoint, EndpointPool, HealthChecker
from serve.gateway.sse import relay_sse

log = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass
class Upstream:
    """What the proxy needs from the app: the shared client, the engine key, health and metrics."""

    client: httpx.AsyncClient
    engine_key: str | None
    checker: HealthChecker
    metrics: GatewayMetrics


@dataclass
class Outcome:
    """What happened to one request, for limits, metrics and the access log."""

    start: float
    endpoint: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft: float | None = None
    # Without the engine's usage (a request cut short), tokens are estimated from what the gateway knows.
    prompt_estimate: int = 0
    content_events: int = 0
    reserved: int = 0
    stream: bool = False
    # Run once when the request is over, whatever the path (answer, error, timeout, disconnect).
    finalizers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def record_usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    @property
    def total_tokens(self) -> int | None:
        """Tokens the request used: the engine's usage, else an estimate; None if no engine ever saw it."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens + (self.completion_tokens or 0)
        if self.content_events:
            return self.prompt_estimate + self.content_events
        if self.endpoint is None:
            return None
        # An engine took it: a stream cut before any token paid for its prompt; a non-streamed answer cut short
        # may have generated everything, so it keeps its whole reservation.
        return self.prompt_estimate if self.stream else self.reserved

    async def finish(self) -> None:
        todo, self.finalizers = self.finalizers, []
        for fn in todo:
            await fn()


class Exchange:
    """One request to one endpoint: releases the endpoint's slot and the engine connection exactly once."""

    def __init__(self, upstream: Upstream, pool: EndpointPool, endpoint: Endpoint, outcome: Outcome) -> None:
        self.upstream = upstream
        self.pool = pool
        self.endpoint = endpoint
        self.outcome = outcome
        self.response: httpx.Response | None = None
        self._open = True
        endpoint.outstanding += 1
        upstream.metrics.inflight.labels(pool.model, endpoint.url).inc()

    def failed(self, reason: str) -> None:
        self.upstream.metrics.errors.labels(self.pool.model, reason).inc()
        self.upstream.checker.failed(self.pool, self.endpoint, reason)

    def record_usage(self, usage: object) -> None:
        self.outcome.record_usage(usage)
        m, model = self.upstream.metrics, self.pool.model
        m.prompt_tokens.labels(model).inc(self.outcome.prompt_tokens or 0)
        m.completion_tokens.labels(model).inc(self.outcome.completion_tokens or 0)

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self.endpoint.outstanding -= 1
        self.upstream.metrics.inflight.labels(self.pool.model, self.endpoint.url).dec()
        if self.response is not None:
            # Closing the connection mid-generation is what makes vLLM abort the request.
            await self.response.aclose()


class ProxyStream(StreamingResponse):
    """A streaming response that releases the exchange and finishes the request even if it never started."""

    def __init__(self, content: AsyncIterator[bytes], exchange: Exchange) -> None:
        super().__init__(content, status_code=200, media_type="text/event-stream", headers=SSE_HEADERS)
        self.exchange = exchange

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.exchange.close()
            await self.exchange.outcome.finish()


def upstream_error(status: int, body: bytes) -> GatewayError:
    """Turn an engine's error response into the envelope, keeping its message where there is one."""
    message = f"engine returned HTTP {status}"
    try:
        data = json.loads(body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            message = str(err["message"])
        elif isinstance(data, dict) and isinstance(data.get("message"), str):
            message = data["message"]
    except (ValueError, UnicodeDecodeError):
        pass
    if status in (401, 403):
        return UpstreamError("the engine refused the gateway's internal key (check LLMSERVE_ENGINE_KEY)")
    if status == 503:
        return from_status(503, f"engine unavailable: {message}")
    if status >= 500:
        return UpstreamError(f"engine error: {message}")
    return from_status(status, message)


ERROR_BODY_LIMIT = 16 * 1024
ERROR_BODY_SECONDS = 5.0


async def read_error_body(resp: httpx.Response) -> bytes:
    """An engine's error body, bounded in size and time; a broken one reads as empty."""
    body = b""
    try:
        async with asyncio.timeout(ERROR_BODY_SECONDS):
            async for chunk in resp.aiter_raw():
                body += chunk
                if len(body) >= ERROR_BODY_LIMIT:
                    break
    except (TimeoutError, httpx.HTTPError):
        log.warning("engine error body could not be read")
    return body[:ERROR_BODY_LIMIT]


async def wait_for_disconnect(receive: Callable[[], Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def remaining(outcome: Outcome, limit: float) -> float:
    return max(0.0, outcome.start + limit - time.perf_counter())


async def send_upstream(
    upstream: Upstream,
    pool: EndpointPool,
    timeouts: Timeouts,
    request: tuple[str, bytes, str, bool],
    outcome: Outcome,
    affinity: str | None,
) -> Exchange:
    """Send to an endpoint; one retry elsewhere on a connect error or a 503, never after the first byte."""
    path, content, request_id, stream = request
    headers = {"content-type": "application/json", "x-request-id": request_id}
    if upstream.engine_key:
        headers["authorization"] = f"Bearer {upstream.engine_key}"
    # Streams: vLLM answers with headers at once, the first event follows prefill. Non-streams: headers at the end.
    headers_within = timeouts.first_byte if stream else timeouts.total
    httpx_timeout = httpx.Timeout(connect=timeouts.connect, read=None, write=timeouts.connect, pool=timeouts.connect)
    tried: set[str] = set()
    error: GatewayError = from_status(503, f"no healthy engine for model {pool.model!r}")
    for attempt in range(2):
        endpoint = pool.choose(affinity, exclude=frozenset(tried))
        if endpoint is None:
            break
        if attempt:
            upstream.metrics.retries.labels(pool.model).inc()
        else:
            upstream.metrics.overhead.labels(pool.model).observe(time.perf_counter() - outcome.start)
        tried.add(endpoint.url)
        exchange = Exchange(upstream, pool, endpoint, outcome)
        outcome.endpoint = endpoint.url
        req = upstream.client.build_request(
            "POST", endpoint.url + path, content=content, headers=headers, timeout=httpx_timeout
        )
        try:
            async with asyncio.timeout(remaining(outcome, headers_within)):
                exchange.response = await upstream.client.send(req, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            outcome.endpoint = None  # the engine never saw it
            await exchange.close()
            exchange.failed("connect_error")
            log.warning("engine %s unreachable: %s", endpoint.url, type(exc).__name__)
            error = from_status(503, f"engine for model {pool.model!r} is unreachable")
            continue
        except TimeoutError:
            await exchange.close()
            exchange.failed("first_byte_timeout")
            raise UpstreamTimeout("the engine did not answer in time") from None
        except httpx.HTTPError as exc:
            await exchange.close()
            exchange.failed("upstream_broken")
            raise UpstreamError(f"engine request failed: {type(exc).__name__}") from None
        except BaseException:
            await exchange.close()
            raise
        if exchange.response.status_code == 503:
            try:
                error = upstream_error(503, await read_error_body(exchange.response))
            finally:
                await exchange.close()
            exchange.failed("upstream_503")
            continue
        return exchange
    upstream.metrics.errors.labels(pool.model, "unavailable").inc()
    error.headers.setdefault("retry-after", "1")
    raise error


async def forward(
    request: Request,
    upstream: Upstream,
    pool: EndpointPool,
    path: str,
    prepared: Prepared,
    outcome: Outcome,
    timeouts: Timeouts,
) -> Response:
    """Proxy one request. Until the response starts, a client that leaves closes the upstream request too."""
    work = asyncio.ensure_future(exchange_with_engine(request, upstream, pool, path, prepared, outcome, timeouts))
    leaving = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work, leaving}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
    finally:
        leaving.cancel()
        if not work.done():
            # Cancelling closes the engine connection, which is what makes vLLM abort the generation.
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, GatewayError):
                await work
    log.info("client disconnected before the response started; engine request closed")
    upstream.metrics.errors.labels(pool.model, "client_disconnected").inc()
    return Response(status_code=499)


async def exchange_with_engine(
    request: Request,
    upstream: Upstream,
    pool: EndpointPool,
    path: str,
    prepared: Prepared,
    outcome: Outcome,
    timeouts: Timeouts,
) -> Response:
    content = json.dumps(prepared.body, separators=(",", ":")).encode()
    call = (path, content, str(request.state.request_id), prepared.stream)
    exchange = await send_upstream(upstream, pool, timeouts, call, outcome, prepared.affinity)
    resp = exchange.response
    assert resp is not None
    handed_over = False
    try:
        if resp.status_code != 200:
            body = await read_error_body(resp)
            if resp.status_code >= 500:
                exchange.failed(f"upstream_{resp.status_code}")
            else:
                upstream.checker.succeeded(exchange.endpoint)
            raise upstream_error(resp.status_code, body)
        if prepared.stream:
            chunks = resp.aiter_raw()
            try:
                # Peek at the first event: a timeout here is still a 504, not a broken 200.
                async with asyncio.timeout(remaining(outcome, timeouts.first_byte)):
                    first = await anext(chunks)
            except TimeoutError:
                exchange.failed("first_byte_timeout")
                raise UpstreamTimeout("the engine sent no token in time") from None
            except StopAsyncIteration:
                exchange.failed("empty_stream")
                raise UpstreamError("the engine closed the stream without an event") from None
            upstream.checker.succeeded(exchange.endpoint)
            handed_over = True  # the stream owns the exchange from here on
            return ProxyStream(relay_sse(exchange, chunks, first, prepared.strip_usage, timeouts), exchange)
        try:
            async with asyncio.timeout(remaining(outcome, timeouts.total)):
                body = await resp.aread()
        except TimeoutError:
            exchange.failed("total_timeout")
            raise UpstreamTimeout("the engine did not finish in time") from None
        except httpx.HTTPError as exc:
            exchange.failed("upstream_broken")
            raise UpstreamError(f"engine connection failed: {type(exc).__name__}") from None
        upstream.checker.succeeded(exchange.endpoint)
        try:
            exchange.record_usage(json.loads(body).get("usage"))
        except (ValueError, AttributeError):
            log.warning("engine answer is not a JSON object")
        return Response(body, status_code=200, media_type="application/json")
    finally:
        if not handed_over:
            await exchange.close()
