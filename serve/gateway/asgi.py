"""ASGI plumbing of the gateway: types, one pass over the request head, reading the body, sending answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serve.gateway.context import RequestContext
from serve.gateway.errors import ClientClosed, GatewayError, PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def header(scope: Scope, name: bytes) -> bytes | None:
    """A request header's value (names in an ASGI scope are lower-case)."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def head_size(scope: Scope) -> int:
    return sum(len(k) + len(v) + 4 for k, v in scope["headers"])


async def read_body(receive: Receive, limit: int, declared: bytes | None) -> bytes:
    """The whole request body, refused (413) as soon as it passes `limit`; a client that leaves is a 499."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientClosed("the client left while sending the body")
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        return body
    parts = bytearray(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientClosed("the client left while sending the body")
        parts += message.get("body", b"")
        if len(parts) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        if not message.get("more_body", False):
            return bytes(parts)


def response_headers(
    ctx: RequestContext, content_type: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", content_type), (b"x-request-id", (ctx.client_request_id or ctx.id).encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in ctx.headers.items()]
    if extra:
        headers += extra
    return headers


async def send_bytes(
    ctx: RequestContext,
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A whole answer in two messages; `responded` is set first so the end of the answer is not taken for a leave."""
    ctx.status = status
    all_headers = response_headers(ctx, content_type, headers)
    all_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    ctx.responded = True
    await send({"type": "http.response.body", "body": body})


async def send_error(ctx: RequestContext, send: Send, exc: GatewayError) -> None:
    ctx.headers.update(exc.headers)
    await send_bytes(ctx, send, exc.http_status, exc.body_bytes())
