"""Forwarding a prepared request to an engine: endpoint choice, status before the first byte, SSE pass-through."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from serve.gateway.errors import (
    GatewayError,
    UpstreamError,
    UpstreamTimeout,
    envelope_bytes,
    from_status,
)
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.policy import Prepared
from serve.gateway.pool import Endpoint, EndpointPool, HealthChecker

log = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass
class Upstream:
    """What the proxy needs from the app: the shared client, the engine key, health and metrics."""

    client: httpx.AsyncClient
    engine_key: str | None
    checker: HealthChecker
    metrics: GatewayMetrics


class Exchange:
    """One request's bookkeeping: releases its endpoint and in-flight slot exactly once."""

    def __init__(self, upstream: Upstream, pool: EndpointPool, endpoint: Endpoint, start: float) -> None:
        self.upstream = upstream
        self.pool = pool
        self.endpoint = endpoint
        self.start = start
        self.response: httpx.Response | None = None
        self._open = True
        endpoint.outstanding += 1
        upstream.metrics.inflight.labels(pool.model).inc()

    def record_usage(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        m = self.upstream.metrics
        m.prompt_tokens.labels(self.pool.model).inc(int(usage.get("prompt_tokens") or 0))
        m.completion_tokens.labels(self.pool.model).inc(int(usage.get("completion_tokens") or 0))

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self.endpoint.outstanding -= 1
        self.upstream.metrics.inflight.labels(self.pool.model).dec()
        if self.response is not None:
            # Closing the connection mid-generation is what makes vLLM abort the request.
            await self.response.aclose()


class ProxyStream(StreamingResponse):
    """A streaming response that releases the exchange even if the body iterator never started."""

    def __init__(self, content: AsyncIterator[bytes], exchange: Exchange, headers: dict[str, str]) -> None:
        super().__init__(content, status_code=200, media_type="text/event-stream", headers=headers)
        self.exchange = exchange

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.exchange.close()


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


def has_content(event: bytes) -> bool:
    """Whether an SSE event carries generated text (the first such event is the time to first token)."""
    if not event.startswith(b"data: {"):
        return False
    try:
        data = json.loads(event[6:])
    except ValueError:
        return False
    for choice in data.get("choices") or ():
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if text:
            return True
    return False


def is_usage_event(event: bytes) -> bool:
    try:
        data = json.loads(event[6:])
    except ValueError:
        return False
    return isinstance(data, dict) and not data.get("choices") and isinstance(data.get("usage"), dict)


async def wait_for_disconnect(receive: Callable[[], Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def send_upstream(
    upstream: Upstream, pool: EndpointPool, path: str, content: bytes, request_id: str, start: float
) -> Exchange:
    """Send to the least-loaded healthy endpoint; one retry elsewhere on a connect error or a 503."""
    headers = {"content-type": "application/json", "x-request-id": request_id}
    if upstream.engine_key:
        headers["authorization"] = f"Bearer {upstream.engine_key}"
    tried: set[str] = set()
    last_error: GatewayError = from_status(503, f"no healthy engine for model {pool.model!r}")
    for _ in range(2):
        endpoint = pool.choose()
        if endpoint is None or endpoint.url in tried:
            break
        tried.add(endpoint.url)
        exchange = Exchange(upstream, pool, endpoint, start)
        upstream.metrics.overhead.labels(pool.model).observe(time.perf_counter() - start)
        req = upstream.client.build_request("POST", endpoint.url + path, content=content, headers=headers)
        try:
            exchange.response = await upstream.client.send(req, stream=True)
        except asyncio.CancelledError:
            await exchange.close()
            raise
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            await exchange.close()
            upstream.checker.mark(pool, endpoint, healthy=False)
            log.warning("engine %s unreachable: %s", endpoint.url, type(exc).__name__)
            last_error = from_status(503, f"engine for model {pool.model!r} is unreachable")
            continue
        except httpx.TimeoutException:
            await exchange.close()
            upstream.metrics.errors.labels(pool.model, "upstream_timeout").inc()
            raise UpstreamTimeout("the engine did not answer in time") from None
        except httpx.HTTPError as exc:
            await exchange.close()
            raise UpstreamError(f"engine request failed: {type(exc).__name__}") from None
        if exchange.response.status_code == 503:
            body = await exchange.response.aread()
            await exchange.close()
            last_error = upstream_error(503, body)
            continue
        return exchange
    upstream.metrics.errors.labels(pool.model, "unavailable").inc()
    last_error.headers.setdefault("retry-after", "1")
    raise last_error


async def forward(
    request: Request, upstream: Upstream, pool: EndpointPool, path: str, prepared: Prepared, start: float
) -> Response:
    """Proxy one request. Until the response starts, a client that leaves closes the upstream request too."""
    content = json.dumps(prepared.body, separators=(",", ":")).encode()
    work = asyncio.ensure_future(exchange_with_engine(request, upstream, pool, path, prepared, content, start))
    leaving = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
    if work.done():
        return work.result()
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
    content: bytes,
    start: float,
) -> Response:
    exchange = await send_upstream(upstream, pool, path, content, str(request.state.request_id), start)
    resp = exchange.response
    assert resp is not None
    if resp.status_code != 200:
        try:
            body = await resp.aread()
        finally:
            await exchange.close()
        upstream.metrics.errors.labels(pool.model, f"upstream_{resp.status_code // 100}xx").inc()
        raise upstream_error(resp.status_code, body)
    if prepared.stream:
        return ProxyStream(relay_sse(exchange, prepared.strip_usage), exchange, SSE_HEADERS)
    try:
        body = await resp.aread()
    except httpx.TimeoutException:
        upstream.metrics.errors.labels(pool.model, "upstream_timeout").inc()
        raise UpstreamTimeout("the engine did not finish in time") from None
    except httpx.HTTPError as exc:
        raise UpstreamError(f"engine connection failed: {type(exc).__name__}") from None
    finally:
        await exchange.close()
    upstream.metrics.ttft.labels(pool.model).observe(time.perf_counter() - start)
    try:
        exchange.record_usage(json.loads(body).get("usage"))
    except (ValueError, AttributeError):
        log.warning("engine answer is not a JSON object")
    return Response(body, status_code=200, media_type="application/json")


async def relay_sse(exchange: Exchange, strip_usage: bool) -> AsyncIterator[bytes]:
    """Pass SSE events through as they arrive; count usage; drop the usage event the client did not ask for."""
    resp = exchange.response
    assert resp is not None
    metrics, model = exchange.upstream.metrics, exchange.pool.model
    first_token_seen = False
    pending = b""
    try:
        async for chunk in resp.aiter_raw():
            pending += chunk
            out: list[bytes] = []
            while (end := pending.find(b"\n\n")) != -1:
                event, pending = pending[: end + 2], pending[end + 2 :]
                if not first_token_seen and has_content(event):
                    first_token_seen = True
                    metrics.ttft.labels(model).observe(time.perf_counter() - exchange.start)
                if b'"usage"' in event and event.startswith(b"data: {") and is_usage_event(event):
                    # The final usage event (no choices) counts once, even with continuous usage stats.
                    exchange.record_usage(json.loads(event[6:]).get("usage"))
                    if strip_usage:
                        continue
                out.append(event)
            if out:
                yield b"".join(out)
        if pending:
            yield pending
    except httpx.TimeoutException:
        metrics.errors.labels(model, "upstream_timeout_midstream").inc()
        yield b"data: " + envelope_bytes("the engine stopped sending in time", "timeout_error", "upstream_timeout")
        yield b"\n\n"
    except httpx.HTTPError as exc:
        metrics.errors.labels(model, "upstream_broken_midstream").inc()
        log.warning("engine stream broke: %s", type(exc).__name__)
        message = "the engine connection broke during the stream"
        yield b"data: " + envelope_bytes(message, "upstream_error", "upstream_broken") + b"\n\n"
    finally:
        await exchange.close()
