"""HTTP routes: the OpenAI-compatible API, health, readiness and metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from serve.config.gateway import ModelRoute
from serve.gateway.errors import BadRequest, NotFound, PayloadTooLarge, Unavailable, error_response
from serve.gateway.keystore import KeyStore
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.policy import Kind, apply_policy, check_access
from serve.gateway.pool import EndpointPool
from serve.gateway.proxy import Upstream, forward


@dataclass
class GatewayState:
    """Resources owned by the lifespan, handed to handlers as a typed dependency."""

    routes: dict[str, tuple[ModelRoute, EndpointPool]]
    pools: list[EndpointPool]
    upstream: Upstream
    keystore: KeyStore
    metrics: GatewayMetrics
    max_body_bytes: int
    created: int


def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.state.gateway
    return state


State = Annotated[GatewayState, Depends(get_state)]
router = APIRouter()


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
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
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return body


async def generate(request: Request, state: GatewayState, kind: Kind, path: str) -> Response:
    start = float(request.state.start)
    body = await read_json_body(request, state.max_body_bytes)
    requested = body.get("model")
    if not isinstance(requested, str) or not requested:
        raise BadRequest("model is required and must be a string", param="model", code="missing_required_parameter")
    found = state.routes.get(requested)
    if found is None:
        raise NotFound(f"The model {requested!r} does not exist.", param="model", code="model_not_found")
    route, pool = found
    request.state.model = route.model.name
    check_access(request.state.key, route.model, requested)
    prepared = apply_policy(body, route.model, kind)
    return await forward(request, state.upstream, pool, path, prepared, start)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State) -> Response:
    return await generate(request, state, "chat", "/v1/chat/completions")


@router.post("/v1/completions")
async def completions(request: Request, state: State) -> Response:
    return await generate(request, state, "completion", "/v1/completions")


@router.get("/v1/models")
async def list_models(request: Request, state: State) -> JSONResponse:
    key = request.state.key
    data = []
    for name, (route, _) in state.routes.items():
        if key.models and not set(key.models) & set(route.model.names):
            continue
        data.append(
            {
                "id": name,
                "object": "model",
                "created": state.created,
                "owned_by": "llmserve",
                "root": route.model.name,
            }
        )
    return JSONResponse({"object": "list", "data": data})


@router.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(state: State) -> Response:
    waiting = [pool.model for pool in state.pools if not pool.ready]
    if waiting:
        return error_response(Unavailable(f"no healthy engine yet for: {', '.join(waiting)}", code="not_ready"))
    return JSONResponse({"status": "ready", "models": [pool.model for pool in state.pools]})


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
