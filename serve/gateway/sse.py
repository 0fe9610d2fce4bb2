"""Relaying an engine's SSE stream: events as they arrive, TTFT and inter-token gaps, usage, idle/total timeouts."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx

from serve.config.model_file import Timeouts
from serve.gateway.errors import envelope_bytes

if TYPE_CHECKING:
    from serve.gateway.proxy import Exchange

log = logging.getLogger(__name__)


def has_content(event: bytes) -> bool:
    """Whether an SSE event carries generated text, judged on bytes (no JSON parse on the hot path)."""
    for marker in (b'"content":"', b'"content": "', b'"text":"', b'"text": "'):
        at = event.find(marker)
        if at != -1 and event[at + len(marker) : at + len(marker) + 1] not in (b'"', b""):
            return True
    return False


def usage_of(event: bytes) -> dict[str, object] | None:
    """The usage of the final usage event (no choices), or None for any other event."""
    if b'"usage"' not in event or not event.startswith(b"data: {"):
        return None
    try:
        data = json.loads(event[6:])
    except ValueError:
        return None
    usage = data.get("usage") if isinstance(data, dict) and not data.get("choices") else None
    return usage if isinstance(usage, dict) else None


def error_event(message: str, type_: str, code: str) -> bytes:
    return b"data: " + envelope_bytes(message, type_, code) + b"\n\n"


class _Relay:
    """Per-stream state: timing of content events and the usage event's handling."""

    def __init__(self, exchange: Exchange, strip_usage: bool) -> None:
        self.exchange = exchange
        self.strip_usage = strip_usage
        self.last_token: float | None = None

    def keep(self, event: bytes) -> bool:
        """Record what the event says; False for the usage event the client did not ask for."""
        outcome, metrics, model = self.exchange.outcome, self.exchange.upstream.metrics, self.exchange.pool.model
        if has_content(event):
            outcome.content_events += 1
            now = time.perf_counter()
            if self.last_token is None:
                outcome.ttft = now - outcome.start
                metrics.ttft.labels(model).observe(outcome.ttft)
            else:
                metrics.itl.labels(model).observe(now - self.last_token)
            self.last_token = now
        elif (usage := usage_of(event)) is not None:
            # The final usage event counts once, even with continuous usage stats on.
            self.exchange.record_usage(usage)
            return not self.strip_usage
        return True


async def relay_sse(
    exchange: Exchange, chunks: AsyncIterator[bytes], first: bytes, strip_usage: bool, timeouts: Timeouts
) -> AsyncIterator[bytes]:
    """Pass events through as they arrive; a failure after the first byte becomes an SSE error event."""
    relay = _Relay(exchange, strip_usage)
    outcome = exchange.outcome
    # SSE allows CRLF line ends; normalising lets one splitter serve both (a lone trailing CR waits for its LF).
    pending = first.replace(b"\r\n", b"\n")
    try:
        while True:
            out: list[bytes] = []
            while (end := pending.find(b"\n\n")) != -1:
                event, pending = pending[: end + 2], pending[end + 2 :]
                if relay.keep(event):
                    out.append(event)
            if out:
                yield b"".join(out)
            total_left = outcome.start + timeouts.total - time.perf_counter()
            try:
                async with asyncio.timeout(max(0.0, min(timeouts.idle, total_left))):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError:
                reason = "idle_timeout" if timeouts.idle < total_left else "total_timeout"
                exchange.failed(reason)
                yield error_event(f"the engine stream hit the {reason.replace('_', ' ')}", "timeout_error", reason)
                return
            pending = (pending + chunk).replace(b"\r\n", b"\n")
        # A last event without its blank line is still an event: count it and strip it like the others.
        if pending.strip() and relay.keep(pending):
            yield pending if pending.endswith(b"\n\n") else pending.rstrip(b"\n") + b"\n\n"
    except httpx.HTTPError as exc:
        exchange.failed("upstream_broken_midstream")
        log.warning("engine stream broke: %s", type(exc).__name__)
        yield error_event("the engine connection broke during the stream", "upstream_error", "upstream_broken")
    finally:
        await exchange.close()
