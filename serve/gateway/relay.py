"""Relaying an engine's SSE stream to the client: event by event, TTFT and gaps, usage, idle/total/write bounds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from serve.config.model_file import Timeouts
from serve.gateway.asgi import SSE_HEADERS, Send, response_headers
from serve.gateway.context import RequestContext
from serve.gateway.errors import envelope_bytes
from serve.gateway.metrics import EventSeries, GatewayMetrics
from serve.gateway.upstream import EngineBroken
from serve.protocol.stream import EventSplitter, EventTooLarge, Kind, classify, usage_of

log = logging.getLogger(__name__)


class Watchdog:
    """Cancels a task when it makes no progress for `idle` seconds, or at a fixed deadline.

    Progress is one float store (`touch`); the timer is re-armed only when it fires early, so a stream of many
    events costs no timer work per event. It bounds the engine's silences and the client's, since a client that
    stops reading makes the relay wait in `send`.
    """

    __slots__ = ("_loop", "_task", "_idle", "_deadline", "_handle", "last", "expired")

    def __init__(self, idle: float, deadline: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._idle = idle
        self._deadline = deadline
        self.last = self._loop.time()
        self.expired: str | None = None
        self._handle = self._loop.call_at(min(self.last + idle, deadline), self._check)

    def touch(self) -> None:
        self.last = self._loop.time()

    def _check(self) -> None:
        now = self._loop.time()
        due = min(self.last + self._idle, self._deadline)
        if now < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self.expired = "total_timeout" if now >= self._deadline else "idle_timeout"
        self._task.cancel()

    def stop(self) -> None:
        self._handle.cancel()


def error_event(message: str, type_: str, code: str) -> bytes:
    return b"data: " + envelope_bytes(message, type_, code) + b"\n\n"


@dataclass(slots=True)
class StreamRelay:
    """One stream's relay: what it needs from the request, the metrics and the endpoint it came from."""

    ctx: RequestContext
    metrics: GatewayMetrics
    timeouts: Timeouts
    # The client did not ask for the usage event: the gateway asked for it (to count tokens) and drops it.
    strip_usage: bool
    # Called with a reason when the engine fails mid-stream (counts it, may eject the endpoint).
    on_failure: Callable[[str], None]
    max_event_bytes: int
    _itl: EventSeries = field(init=False)
    _last: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._itl = self.metrics.itl.labels(self.ctx.model)

    def _keep(self, event: bytes) -> bool:
        kind = classify(event)
        if kind is Kind.OUTPUT:
            ctx = self.ctx
            ctx.output_events += 1
            now = time.perf_counter()
            if ctx.ttft is None:
                ctx.ttft = now - ctx.start
                self.metrics.ttft.labels(ctx.model).observe(ctx.ttft)
            else:
                self._itl.observe(now - self._last)
            self._last = now
        elif kind is Kind.USAGE:
            usage = usage_of(event)
            if usage is not None:
                # The final usage event counts once, even with continuous usage stats on.
                self.ctx.record_usage(usage)
            return not self.strip_usage
        return True

    async def run(self, send: Send, first: bytes, chunks: AsyncIterator[bytes]) -> None:
        """Send the answer's head, then every event; a failure after the head becomes an SSE error event."""
        ctx = self.ctx
        ctx.status = 200
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": response_headers(ctx, SSE_HEADERS[0][1], SSE_HEADERS[1:]),
            }
        )
        splitter = EventSplitter(self.max_event_bytes)
        total_deadline = asyncio.get_running_loop().time() + max(
            0.0, ctx.start + self.timeouts.total - time.perf_counter()
        )
        dog = Watchdog(self.timeouts.idle, total_deadline)
        closing = b""
        chunk = first
        at_client = False
        # The server holds the head back until the first body bytes: the first round sends, even if empty.
        head_sent = False
        try:
            while True:
                events = splitter.feed(chunk)
                if len(events) == 1:
                    body = events[0] if self._keep(events[0]) else b""
                else:
                    body = b"".join(e for e in events if self._keep(e))
                if body or not head_sent:
                    head_sent = at_client = True
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    at_client = False
                chunk = await anext(chunks)
                # Progress once a round: the engine's silence and a client's stall both count from here.
                dog.touch()
        except StopAsyncIteration:
            # A last event without its blank line is still an event: count it and strip it like the others.
            rest = splitter.flush()
            if rest is not None and self._keep(rest):
                closing = rest
        except asyncio.CancelledError:
            if dog.expired is None:
                raise
            # Our own watchdog, not a cancellation of the request.
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            if at_client:
                # The client stopped reading: nothing more can reach it. Returning without the last message makes
                # the server close the connection; the request's resources are released as for any other end.
                self.on_failure("client_write_timeout")
                log.warning("client did not read the stream for %.0f s: closing it", self.timeouts.idle)
                return
            self.on_failure(dog.expired)
            closing = error_event(
                f"the engine stream hit the {dog.expired.replace('_', ' ')}", "timeout_error", dog.expired
            )
        except EngineBroken as exc:
            self.on_failure("upstream_broken_midstream")
            log.warning("engine stream broke: %s", exc)
            closing = error_event("the engine connection broke during the stream", "upstream_error", "upstream_broken")
        except EventTooLarge as exc:
            self.on_failure("event_too_large")
            log.warning("engine stream: %s", exc)
            closing = error_event(
                "the engine sent an event larger than the gateway relays", "upstream_error", "event_too_large"
            )
        finally:
            dog.stop()
        ctx.responded = True
        try:
            async with asyncio.timeout(self.timeouts.idle):
                await send({"type": "http.response.body", "body": closing, "more_body": False})
        except TimeoutError:
            log.warning("client did not read the end of the stream: closing it")
