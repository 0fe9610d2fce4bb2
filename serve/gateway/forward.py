"""Admission and forwarding, the part every engine-bound route shares: lease, limits, settlement, the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import time

import orjson

from serve.gateway.asgi import Receive, Send
from serve.gateway.context import RequestContext
from serve.gateway.errors import BadRequest, RateLimited, Unavailable
from serve.gateway.policy import Prepared
from serve.gateway.pool import Lease
from serve.gateway.proxy import Forward, Proxy
from serve.gateway.state import GatewayState, ModelState

# vLLM's priority scheduling serves lower values first.
ENGINE_PRIORITY = {"interactive": -10, "standard": 0, "batch": 10}


def take_lease(state: GatewayState, ctx: RequestContext, lease: contextlib.AbstractContextManager[Lease]) -> Lease:
    """The request's endpoint, held until the request ends; a refusal is counted by why."""
    try:
        return ctx.resources.enter_context(lease)
    except Unavailable as exc:
        ctx.failure = "overloaded" if exc.code == "overloaded" else "unavailable"
        state.metrics.errors.labels(ctx.model, ctx.failure).inc()
        raise


async def admit(state: GatewayState, ctx: RequestContext, reserve_tokens: int) -> None:
    """Take the key's limits for this request; they are settled from its usage when the request ends."""
    assert ctx.key is not None
    key = ctx.key
    try:
        ticket = await state.limiter.acquire(key, reserve_tokens)
    except RateLimited as exc:
        state.metrics.rate_limited.labels(ctx.model, key.id, exc.code or "rate_limit").inc()
        raise
    except Unavailable as exc:  # the limits backend is down: refused rather than let through unlimited
        state.metrics.errors.labels(ctx.model, exc.code or "unavailable").inc()
        ctx.failure = exc.code
        raise

    async def settle() -> None:
        await state.limiter.settle(ticket, ctx.total_tokens)

    ctx.resources.push_async_callback(settle)
    ctx.headers.update(ticket.headers)


async def schedule(state: GatewayState, ctx: RequestContext, found: ModelState, prepared: Prepared) -> Lease:
    """Limits first (a refused request never waits), then a place from the model's queue, held until the end."""
    assert ctx.key is not None and found.scheduler is not None
    key, metrics, pool = ctx.key, state.metrics, found.pool
    try:
        pool.check_cap()
    except Unavailable as exc:
        metrics.errors.labels(ctx.model, exc.code or "unavailable").inc()
        raise
    await admit(state, ctx, prepared.reserve_tokens)
    started = time.perf_counter()
    try:
        lease = await found.scheduler.admit(key, prepared.affinity, prepared.prompt_tokens)
    except (RateLimited, Unavailable) as exc:
        ctx.failure = exc.code or "unavailable"
        metrics.errors.labels(ctx.model, ctx.failure).inc()
        raise
    ctx.queue_wait = time.perf_counter() - started
    metrics.queue_wait.labels(ctx.model, key.priority).observe(ctx.queue_wait)
    held = ctx.resources.enter_context(lease)
    scheduler = found.scheduler

    def finished() -> None:
        # Before the lease ends (releases run last-taken first): the next pick sees this request's tokens.
        output = ctx.completion_tokens if ctx.completion_tokens is not None else ctx.output_events
        prompt = ctx.prompt_tokens if ctx.prompt_tokens is not None else ctx.prompt_estimate
        scheduler.finished(key, output)
        metrics.served_tokens.labels(ctx.model, key.id).inc(prompt + output)

    ctx.resources.callback(finished)
    return held


async def forward(
    state: GatewayState,
    ctx: RequestContext,
    receive: Receive,
    send: Send,
    found: ModelState,
    prepared: Prepared,
    path: str,
    lease: contextlib.AbstractContextManager[Lease] | None = None,
    preparing: contextlib.AsyncExitStack | None = None,
) -> None:
    """Lease (from the model's queue, by its routing, or the lease given), admit, then proxy `prepared` to `path`.

    `preparing` holds a large body's place among those in preparation: it is let go once the body is serialised.
    """
    assert ctx.key is not None
    ctx.prompt_estimate, ctx.reserved, ctx.stream = prepared.prompt_tokens, prepared.reserve_tokens, prepared.stream
    # From here a client that leaves is noticed, queued or not: its place and its reservation come back at once.
    ctx.watch_client(receive, state.client_watch)
    # The queue leases from its model's pool; a narrower view of it (an adapter's replicas) leases by its own routing.
    if lease is None and found.scheduler is not None and found.scheduler.pool is found.pool:
        held = await schedule(state, ctx, found, prepared)
    else:
        held = take_lease(state, ctx, lease if lease is not None else found.pool.lease(prepared.affinity))
        await admit(state, ctx, prepared.reserve_tokens)
    if found.model.engine.scheduling_policy == "priority":
        # The engine orders its own queue too (lower goes first); a client cannot choose this (fields policy).
        prepared.body["priority"] = ENGINE_PRIORITY[ctx.key.priority]
    large = preparing is not None
    try:
        content = await asyncio.to_thread(orjson.dumps, prepared.body) if large else orjson.dumps(prepared.body)
    except orjson.JSONEncodeError:  # nesting past what is written back (255 levels)
        raise BadRequest("request body is nested too deeply", code="invalid_json") from None
    if preparing is not None:
        await preparing.aclose()
    fwd = Forward(path, content, prepared.stream, prepared.strip_usage, found.model.policy.timeouts)
    await Proxy(state.upstream, ctx, held, fwd).answer(send)
