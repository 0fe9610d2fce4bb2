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
    for marker in (b'"content":"', b'"text":"'):
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


async def relay_sse(
    exchange: Exchange, chunks: AsyncIterator[bytes], first: bytes, strip_usage: bool, timeouts: Timeouts
) -> AsyncIterator[bytes]:
    """Pass events through as they arrive; a failure after the first byte becomes an SSE error event."""
    metrics, model, outcome = exchange.upstream.metrics, exchange.pool.model, exchange.outcome
    last_token: float | None = None
    pending = first
    try:
        while True:
            out: list[bytes] = []
            while (end := pending.find(b"\n\n")) != -1:
                event, pending = pending[: end + 2], pending[end + 2 :]
                if has_content(event):
                    outcome.content_events += 1
                    now = time.perf_counter()
                    if last_token is None:
                        outcome.ttft = now - outcome.start
                        metrics.ttft.labels(model).observe(outcome.ttft)
                    else:
                        metrics.itl.labels(model).observe(now - last_token)
                    last_token = now
                elif (usage := usage_of(event)) is not None:
                    # The final usage event counts once, even with continuous usage stats on.
                    exchange.record_usage(usage)
                    if strip_usage:
                        continue
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
            pending += chunk
        if pending:
            yield pending
    except httpx.HTTPError as exc:
        exchange.failed("upstream_broken_midstream")
        log.warning("engine stream broke: %s", type(exc).__name__)
        yield error_event("the engine connection broke during the stream", "upstream_error", "upstream_broken")
    finally:
        await exchange.close()
