"""Admission and forwarding, the part every engine-bound route shares: lease, limits, settlement, the proxy."""

from __future__ import annotations

import contextlib

import orjson

from serve.gateway.asgi import Receive, Send
from serve.gateway.context import RequestContext
from serve.gateway.errors import BadRequest, RateLimited, Unavailable
from serve.gateway.policy import Prepared
from serve.gateway.pool import Lease
from serve.gateway.proxy import Forward, Proxy
from serve.gateway.state import GatewayState, ModelState


def take_lease(state: GatewayState, ctx: RequestContext, lease: contextlib.AbstractContextManager[Lease]) -> Lease:
    """The request's endpoint, held until the request ends; a refusal is counted by why."""
    try:
        return ctx.resources.enter_context(lease)
    except Unavailable as exc:
        state.metrics.errors.labels(ctx.model, "overloaded" if exc.code == "overloaded" else "unavailable").inc()
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

    async def settle() -> None:
        await state.limiter.settle(ticket, ctx.total_tokens)

    ctx.resources.push_async_callback(settle)
    ctx.headers.update(ticket.headers)


async def forward(
    state: GatewayState,
    ctx: RequestContext,
    receive: Receive,
    send: Send,
    found: ModelState,
    prepared: Prepared,
    path: str,
    lease: contextlib.AbstractContextManager[Lease] | None = None,
) -> None:
    """Lease (by the model's routing unless a lease is given), admit, then proxy `prepared` to the engine's `path`."""
    held = take_lease(state, ctx, lease if lease is not None else found.pool.lease(prepared.affinity))
    await admit(state, ctx, prepared.reserve_tokens)
    ctx.prompt_estimate, ctx.reserved, ctx.stream = prepared.prompt_tokens, prepared.reserve_tokens, prepared.stream
    ctx.watch_client(receive)
    try:
        content = orjson.dumps(prepared.body)
    except orjson.JSONEncodeError:  # nesting past what is written back (255 levels)
        raise BadRequest("request body is nested too deeply", code="invalid_json") from None
    fwd = Forward(path, content, prepared.stream, prepared.strip_usage, found.model.policy.timeouts)
    await Proxy(state.upstream, ctx, held, fwd).answer(send)
