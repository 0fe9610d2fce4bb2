"""The gateway's routes: the OpenAI-compatible API, health, readiness, metrics and the API description."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serve.gateway.asgi import Receive, Scope, Send, header, read_body, send_bytes, send_error
from serve.gateway.bodies import INLINE_BODY_BYTES, parse_json_object, requested_model
from serve.gateway.catalog import Catalog
from serve.gateway.context import RequestContext
from serve.gateway.errors import Forbidden, NotFound, Unauthorized, Unavailable
from serve.gateway.fields import check_media_hosts
from serve.gateway.forward import forward
from serve.gateway.paths import RouteTable
from serve.gateway.policy import Kind, apply_policy, check_access
from serve.gateway.routes_api import Surface
from serve.gateway.state import GatewayState

Handler = Callable[[GatewayState, RequestContext, Scope, Receive, Send], Awaitable[None]]


def generation(kind: Kind, path: str, catalog: Catalog) -> Handler:
    async def handle(state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send) -> None:
        await generate(state, ctx, scope, receive, send, kind, path, catalog)

    return handle


async def generate(
    state: GatewayState,
    ctx: RequestContext,
    scope: Scope,
    receive: Receive,
    send: Send,
    kind: Kind,
    path: str,
    catalog: Catalog,
) -> None:
    if state.drain.active:
        raise Unavailable("the gateway is shutting down", code="draining", headers={"retry-after": "1"})
    raw = await read_body(receive, state.max_body_bytes, header(scope, b"content-length"))
    off_loop = len(raw) > INLINE_BODY_BYTES
    # A large body is parsed, checked and serialised in a worker thread, a few at a time: the loop keeps relaying
    # streams meanwhile, and the memory of bodies in preparation stays bounded. The place is the request's until
    # its body is ready to send (or the request ends first).
    preparing: contextlib.AsyncExitStack | None = None
    if off_loop:
        preparing = contextlib.AsyncExitStack()
        ctx.resources.push_async_callback(preparing.aclose)
        await preparing.enter_async_context(state.large_bodies)
        body = await asyncio.to_thread(parse_json_object, raw)
    else:
        body = parse_json_object(raw)
    del raw
    requested = requested_model(body)
    # A served name or alias, or an adapter (the base model's file under its name, held until the request ends).
    found = catalog.lookup(state, ctx, requested)
    if found is None:
        raise NotFound(f"The model {requested!r} does not exist.", param="model", code="model_not_found")
    model = found.model
    ctx.model = model.name
    check_access(ctx.key, model, requested)
    session_header = header(scope, model.policy.routing.session_header.lower().encode())
    session = session_header.decode("latin-1") if session_header is not None else None
    assert ctx.key is not None
    # Only a tokens-per-minute budget needs the prompt's exact count; a prompt that clearly fits is not tokenized.
    exact = ctx.key.tpm is not None
    policy_args = (body, model, kind, found.counter, session, exact, ctx.key, state.upstream.engine_key)
    if off_loop:
        prepared = await asyncio.to_thread(apply_policy, *policy_args)
    else:
        prepared = apply_policy(*policy_args)
    if prepared.media_hosts:  # before any lease or limit is taken: a slow resolver holds nothing
        await check_media_hosts(prepared.media_hosts, model.policy.fields)
    await forward(state, ctx, receive, send, found, prepared, path, preparing=preparing)


async def list_models(
    state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send, catalog: Catalog
) -> None:
    key = ctx.key
    data: list[dict[str, object]] = [
        {"id": name, "object": "model", "created": state.created, "owned_by": "llmserve", "root": entry.model.name}
        for name, entry in state.models.items()
        if key is None or not key.models or set(key.models) & set(entry.model.names)
    ]
    # Adapters, each with its base model as `parent`, as vLLM lists them.
    data += catalog.cards(state, key, state.created)
    await send_bytes(ctx, send, 200, json.dumps({"object": "list", "data": data}).encode())


async def healthz(state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send) -> None:
    await send_bytes(ctx, send, 200, b'{"status":"ok"}')


async def readyz(state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send) -> None:
    """Readiness for a load balancer: no model names (they are for keys that may see them), counts only."""
    if state.drain.active:
        await send_error(ctx, send, Unavailable("the gateway is shutting down", code="draining"))
        return
    waiting = sum(1 for pool in state.pools if not pool.ready)
    if waiting:
        message = f"no healthy engine yet for {waiting} of {len(state.pools)} models"
        await send_error(ctx, send, Unavailable(message, code="not_ready"))
        return
    # Whether the keys in force are the file's (a broken or deleted file keeps the last good keys): a revocation
    # written to a broken file has not taken effect. The message stays in the log; it may quote the file.
    keys = "stale" if state.keystore.last_error else "ok"
    await send_bytes(ctx, send, 200, json.dumps({"status": "ready", "keys": keys}).encode())


LOOPBACK = ("127.", "::1", "::ffff:127.")


async def metrics(state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send) -> None:
    """Prometheus text: with the metrics key (LLMSERVE_METRICS_KEY) as bearer, or from loopback when none is set.

    The series name key ids and the engines' URLs: nothing for an anonymous client on the network."""
    if state.metrics_key is not None:
        presented = header(scope, b"authorization") or b""
        expected = b"Bearer " + state.metrics_key.encode()
        if not hmac.compare_digest(presented, expected):
            raise Unauthorized("/metrics needs the metrics key: Authorization: Bearer <LLMSERVE_METRICS_KEY>")
    elif not (ctx.client or "").startswith(LOOPBACK):
        raise Forbidden("/metrics answers loopback clients only unless LLMSERVE_METRICS_KEY is set", code="forbidden")
    text = generate_latest(state.metrics.registry)
    await send_bytes(ctx, send, 200, text, CONTENT_TYPE_LATEST.encode())


@dataclass(frozen=True, slots=True)
class Route:
    methods: dict[str, Handler]
    # The label metrics use for it; a path outside the table is "other", never the raw path.
    label: str


async def openapi(state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send) -> None:
    await send_bytes(ctx, send, 200, state.openapi)


def route_table(openapi_document: bool) -> RouteTable[Route]:
    # One per app: the adapters it serves and the stored responses it routes (serve/gateway/routes_api.py).
    surface = Surface()
    catalog = surface.catalog
    table: dict[str, dict[str, Handler]] = {
        "/v1/chat/completions": {"POST": generation("chat", "/v1/chat/completions", catalog)},
        "/v1/completions": {"POST": generation("completion", "/v1/completions", catalog)},
        "/v1/models": {"GET": functools.partial(list_models, catalog=catalog)},
        "/healthz": {"GET": healthz},
        "/readyz": {"GET": readyz},
        "/metrics": {"GET": metrics},
        **surface.routes(),
    }
    if openapi_document:
        table["/openapi.json"] = {"GET": openapi}
    return RouteTable({path: Route(methods, path) for path, methods in table.items()})
