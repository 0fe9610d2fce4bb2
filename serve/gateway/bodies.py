"""Request bodies: read within the size bound and parsed as one JSON object, off the event loop when large."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from serve.gateway.asgi import Receive, Scope, header, read_body
from serve.gateway.errors import BadRequest

# Bodies above this are parsed, templated and tokenized in a worker thread, so one huge prompt cannot stall
# every stream the event loop is relaying.
INLINE_BODY_BYTES = 64 * 1024


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        # orjson refuses what would fail later: invalid UTF-8, lone surrogates, nesting past 1,024 levels.
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest(
            "request body is not valid JSON (or not UTF-8, or nested too deeply)", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return body


async def read_json(scope: Scope, receive: Receive, limit: int) -> tuple[dict[str, Any], bool]:
    """The body as a JSON object, and whether it is large enough that its further work belongs off the loop."""
    raw = await read_body(receive, limit, header(scope, b"content-length"))
    off_loop = len(raw) > INLINE_BODY_BYTES
    body = await asyncio.to_thread(parse_json_object, raw) if off_loop else parse_json_object(raw)
    return body, off_loop


def requested_model(body: dict[str, Any]) -> str:
    requested = body.get("model")
    if not isinstance(requested, str) or not requested:
        raise BadRequest("model is required and must be a string", param="model", code="missing_required_parameter")
    return requested
