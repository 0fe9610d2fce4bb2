"""HTTP routes: the OpenAI-compatible API, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from serve.config.model_file import ModelFile
from serve.gateway.drain import Drain
from serve.gateway.errors import (
    BadRequest,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    error_response,
)
from serve.gateway.keystore import KeyStore
from serve.gateway.limits import Limiter
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.policy import Kind, apply_policy, check_access
from serve.gateway.pool import EndpointPool
from serve.gateway.protocol import BEARER, CHAT_REQUEST, COMPLETION_REQUEST, body
from serve.gateway.proxy import Outcome, ProxyStream, Upstream, forward
from serve.gateway.tokens import TokenCounter


@dataclass
class ModelState:
    model: ModelFile
    pool: EndpointPool
    counter: TokenCounter


@dataclass
class GatewayState:
    """Resources owned by the lifespan, handed to handlers as a typed dependency."""

    # Served names and aliases -> the model's state (aliases share one entry).
    models: dict[str, ModelState]
    pools: list[EndpointPool]
    upstream: Upstream
    keystore: KeyStore
    metrics: GatewayMetrics
    drain: Drain
    limiter: Limiter
    max_body_bytes: int
    created: int


def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.state.gateway
    return state


State = Annotated[GatewayState, Depends(get_state)]
router = APIRouter()


# Bodies above this are parsed, templated and tokenized in a worker thread, so one huge prompt cannot stall
# every stream the event loop is relaying.
INLINE_BODY_BYTES = 64 * 1024


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("request body is not valid JSON (or nested too deeply)", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return body


def admit_to_pool(state: GatewayState, model: ModelFile, pool: EndpointPool, outcome: Outcome) -> None:
    """503 before anything is spent when no engine can take the request; else hold a place in the pool."""
    if not pool.ready:
        state.metrics.errors.labels(model.name, "unavailable").inc()
        raise Unavailable(
            f"no healthy engine for model {model.name!r}", code="no_healthy_endpoint", headers={"retry-after": "1"}
        )
    cap = model.policy.routing.max_inflight
    if cap is not None and pool.admitted >= cap:
        state.metrics.errors.labels(model.name, "overloaded").inc()
        raise Unavailable(
            f"model {model.name!r} is at its limit of {cap} requests in flight",
            code="overloaded",
            headers={"retry-after": "1"},
        )
    # Taken here, with no await since the check, so a burst cannot all pass it.
    pool.admitted += 1

    async def leave() -> None:
        pool.admitted -= 1

    outcome.finalizers.append(leave)


async def generate(request: Request, state: GatewayState, kind: Kind, path: str) -> Response:
    if state.drain.active:
        raise Unavailable("the gateway is shutting down", code="draining", headers={"retry-after": "1"})
    outcome = Outcome(start=float(request.state.start))
    request.state.outcome = outcome
    raw = await read_body(request, state.max_body_bytes)
    body = parse_json_object(raw)
    requested = body.get("model")
    if not isinstance(requested, str) or not requested:
        raise BadRequest("model is required and must be a string", param="model", code="missing_required_parameter")
    found = state.models.get(requested)
    if found is None:
        raise NotFound(f"The model {requested!r} does not exist.", param="model", code="model_not_found")
    model, pool = found.model, found.pool
    request.state.model = model.name
    key = request.state.key
    check_access(key, model, requested)
    session = request.headers.get(model.policy.routing.session_header)
    if len(raw) > INLINE_BODY_BYTES:
        prepared = await asyncio.to_thread(apply_policy, body, model, kind, found.counter, session)
    else:
        prepared = apply_policy(body, model, kind, found.counter, session)
    admit_to_pool(state, model, pool, outcome)
    try:
        ticket = await state.limiter.acquire(key, prepared.reserve_tokens)
    except BaseException as exc:
        if isinstance(exc, RateLimited):
            state.metrics.rate_limited.labels(model.name, key.id, exc.code or "rate_limit").inc()
        await outcome.finish()
        raise
    outcome.prompt_estimate, outcome.reserved, outcome.stream = (
        prepared.prompt_tokens,
        prepared.reserve_tokens,
        prepared.stream,
    )
    outcome.finalizers.append(lambda: state.limiter.settle(ticket, outcome.total_tokens))
    try:
        response = await forward(request, state.upstream, pool, path, prepared, outcome, model.policy.timeouts)
    except GatewayError as exc:
        exc.headers.update(ticket.headers)
        await outcome.finish()
        raise
    except BaseException:
        await outcome.finish()
        raise
    response.headers.update(ticket.headers)
    if not isinstance(response, ProxyStream):
        await outcome.finish()
    return response


@router.post("/v1/chat/completions", openapi_extra={**body(CHAT_REQUEST), **BEARER})
async def chat_completions(request: Request, state: State) -> Response:
    return await generate(request, state, "chat", "/v1/chat/completions")


@router.post("/v1/completions", openapi_extra={**body(COMPLETION_REQUEST), **BEARER})
async def completions(request: Request, state: State) -> Response:
    return await generate(request, state, "completion", "/v1/completions")


@router.get("/v1/models", openapi_extra=BEARER)
async def list_models(request: Request, state: State) -> JSONResponse:
    key = request.state.key
    data = [
        {"id": name, "object": "model", "created": state.created, "owned_by": "llmserve", "root": entry.model.name}
        for name, entry in state.models.items()
        if not key.models or set(key.models) & set(entry.model.names)
    ]
    return JSONResponse({"object": "list", "data": data})


@router.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(state: State) -> Response:
    if state.drain.active:
        return error_response(Unavailable("the gateway is shutting down", code="draining"))
    waiting = [pool.model for pool in state.pools if not pool.ready]
    if waiting:
        return error_response(Unavailable(f"no healthy engine yet for: {', '.join(waiting)}", code="not_ready"))
    return JSONResponse({"status": "ready", "models": [pool.model for pool in state.pools]})


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
