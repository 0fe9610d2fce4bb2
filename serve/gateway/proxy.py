"""Forwarding a prepared request to an engine: retries before the first byte, the status decided before it, answers."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import NoReturn

import orjson

from serve.config.model_file import Timeouts
from serve.gateway.asgi import Send, send_bytes
from serve.gateway.context import RequestContext
from serve.gateway.errors import GatewayError, Unavailable, UpstreamError, UpstreamTimeout, from_status
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.pool import Lease
from serve.gateway.relay import StreamRelay
from serve.gateway.upstream import ConnectFailed, EngineBroken, EngineClient, EngineResponse

log = logging.getLogger(__name__)

ERROR_BODY_LIMIT = 16 * 1024
# Failures that say nothing about the engine.
CLIENT_FAULTS = frozenset({"client_write_timeout"})
ERROR_BODY_SECONDS = 5.0


@dataclass(slots=True)
class Upstream:
    """What the proxy needs from the app: the engine client, the engine key, metrics."""

    client: EngineClient
    engine_key: str | None
    metrics: GatewayMetrics
    max_event_bytes: int


@dataclass(slots=True)
class Forward:
    """One request on its way to an engine: the body to send and how to answer the client."""

    path: str
    body: bytes
    stream: bool
    strip_usage: bool
    timeouts: Timeouts


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
    except (ValueError, UnicodeDecodeError, RecursionError):
        pass
    if status in (401, 403):
        return UpstreamError("the engine refused the gateway's internal key (check LLMSERVE_ENGINE_KEY)")
    if status == 503:
        return Unavailable(f"engine unavailable: {message}")
    if status >= 500:
        return UpstreamError(f"engine error: {message}")
    return from_status(status, message)


async def read_error_body(resp: EngineResponse) -> bytes:
    """An engine's error body, bounded in size and time; a broken one reads as empty."""
    try:
        async with asyncio.timeout(ERROR_BODY_SECONDS):
            return await resp.read(ERROR_BODY_LIMIT)
    except (TimeoutError, EngineBroken):
        log.warning("engine error body could not be read")
        return b""


class Proxy:
    """Sends one request to the engine its lease holds, and answers the client from what comes back."""

    def __init__(self, upstream: Upstream, ctx: RequestContext, lease: Lease, forward: Forward) -> None:
        self.upstream = upstream
        self.ctx = ctx
        self.lease = lease
        self.forward = forward

    def failed(self, reason: str) -> None:
        """Count a failure by reason; those that may be the engine's count towards ejecting it."""
        ctx, metrics = self.ctx, self.upstream.metrics
        metrics.errors.labels(ctx.model, reason).inc()
        ctx.failure = reason
        if reason in CLIENT_FAULTS:
            return
        key_id = ctx.key.id if ctx.key is not None else "none"
        if self.lease.failed(key_id, connect=reason == "connect_error"):
            metrics.ejections.labels(ctx.model).inc()

    def remaining(self, limit: float) -> float:
        return max(0.0, self.ctx.start + limit - time.perf_counter())

    async def send(self) -> EngineResponse:
        """The engine's answer head; one retry elsewhere on a connect error or a 503, never after the first byte.

        The caller bounds the wait (`answer`: one deadline for the head and the first event or the whole body)."""
        ctx, upstream, fwd = self.ctx, self.upstream, self.forward
        headers = {"content-type": "application/json", "x-request-id": ctx.id}
        if upstream.engine_key:
            headers["authorization"] = f"Bearer {upstream.engine_key}"
        upstream.metrics.overhead.labels(ctx.model).observe(time.perf_counter() - ctx.start)
        error: GatewayError
        while True:
            ctx.endpoint = self.lease.endpoint.url
            try:
                resp = await upstream.client.post(
                    self.lease.endpoint.url + fwd.path, fwd.body, headers, fwd.timeouts.connect
                )
            except ConnectFailed as exc:
                ctx.endpoint = None  # the engine never saw it
                self.failed("connect_error")
                log.warning("engine %s unreachable: %s", self.lease.endpoint.url, exc)
                error = Unavailable(f"engine for model {ctx.model!r} is unreachable")
            except EngineBroken as exc:
                self.failed("upstream_broken")
                raise UpstreamError(f"engine request failed: {exc}") from None
            else:
                if resp.status != 503:
                    # Taken: from here the answer is closed with the request, however it ends.
                    ctx.resources.push_async_callback(resp.aclose)
                    return resp
                try:
                    error = upstream_error(503, await read_error_body(resp))
                finally:
                    await resp.aclose()
                self.failed("upstream_503")
            if not self.lease.move():
                break
            upstream.metrics.retries.labels(ctx.model).inc()
        upstream.metrics.errors.labels(ctx.model, "unavailable").inc()
        error.headers.setdefault("retry-after", "1")
        raise error

    async def answer(self, send: Send) -> None:
        """Forward the request and answer the client: an envelope before the first byte, SSE events after it.

        One deadline covers the engine's head and what decides the status: a stream's first event (first_byte from
        the request's start) or a whole non-streamed body (total). Past it, a 504 names the stage that was late."""
        fwd, ctx = self.forward, self.ctx
        stage = "head"
        try:
            async with asyncio.timeout(self.remaining(fwd.timeouts.first_byte if fwd.stream else fwd.timeouts.total)):
                resp = await self.send()
                if resp.status == 200:
                    stage = "body"
                    if fwd.stream:
                        chunks = aiter(resp.chunks())
                        # Peek at the first event: a timeout here is still a 504, not a broken 200.
                        first = await anext(chunks)
                    else:
                        body = await resp.read()
        except TimeoutError:
            if stage == "head":
                self.failed("first_byte_timeout")
                raise UpstreamTimeout("the engine did not answer in time") from None
            if not fwd.stream:
                self.failed("total_timeout")
                raise UpstreamTimeout("the engine did not finish in time") from None
            self.failed("first_byte_timeout")
            raise UpstreamTimeout("the engine sent no token in time") from None
        except StopAsyncIteration:
            self.failed("empty_stream")
            raise UpstreamError("the engine closed the stream without an event") from None
        except EngineBroken as exc:
            self.failed("upstream_broken")
            what = "stream" if fwd.stream else "connection"
            raise UpstreamError(f"engine {what} failed: {exc}") from None
        if resp.status != 200:
            # Its error body has a bound of its own (read_error_body), outside the deadline.
            await self.refuse(resp)
        self.lease.succeeded()
        if fwd.stream:
            relay = StreamRelay(
                ctx, self.upstream.metrics, fwd.timeouts, fwd.strip_usage, self.failed, self.upstream.max_event_bytes
            )
            await relay.run(send, first, chunks)
            self.record_tokens()
            return
        try:
            usage = orjson.loads(body).get("usage")
        except (orjson.JSONDecodeError, AttributeError):
            usage = None
            log.warning("engine answer is not a JSON object")
        if isinstance(usage, dict):
            ctx.record_usage(usage)
        self.record_tokens()
        await send_bytes(ctx, send, 200, body)

    async def refuse(self, resp: EngineResponse) -> NoReturn:
        """An engine's answer other than 200 (and 503, which `send` retried): its envelope, counted by who failed."""
        body = await read_error_body(resp)
        if resp.status >= 500:
            self.failed(f"upstream_{resp.status}")
        else:
            # The engine refused the request: nothing was generated, so nothing is charged.
            self.lease.succeeded()
            self.ctx.prompt_tokens, self.ctx.completion_tokens = 0, 0
        raise upstream_error(resp.status, body)

    def record_tokens(self) -> None:
        ctx, metrics = self.ctx, self.upstream.metrics
        if ctx.prompt_tokens is not None:
            metrics.prompt_tokens.labels(ctx.model).inc(ctx.prompt_tokens)
            metrics.completion_tokens.labels(ctx.model).inc(ctx.completion_tokens or 0)
