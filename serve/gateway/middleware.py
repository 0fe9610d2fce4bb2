"""Pure ASGI middleware, outermost first: header limit -> request id -> metrics and access log -> auth."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.gateway.drain import Drain
from serve.gateway.errors import GatewayError, Unauthorized, error_response
from serve.gateway.keystore import KeyStore
from serve.gateway.metrics import GatewayMetrics, route_label, status_class
from serve.logs import request_id_var

access_log = logging.getLogger("serve.gateway.access")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_state(scope: Scope) -> dict[str, Any]:
    state: dict[str, Any] = scope.setdefault("state", {})
    return state


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class HeaderLimitMiddleware:
    """Refuses requests whose headers exceed a size (431) before anything else looks at them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
            if size > self.max_bytes:
                err = GatewayError(f"request headers are larger than {self.max_bytes} bytes", code="headers_too_large")
                err.status, err.type = 431, "invalid_request_error"
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestIdMiddleware:
    """Accepts a well-formed X-Request-Id or makes one; returns it and makes it available to logs and proxy."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = header(scope, b"x-request-id")
        rid = incoming if incoming and _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state = request_state(scope)
        state["request_id"] = rid
        state["start"] = time.perf_counter()
        token = request_id_var.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class MetricsMiddleware:
    """Counts every response by model, key, route template and status class; one JSON access log line each."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, drain: Drain) -> None:
        self.app = app
        self.metrics = metrics
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        route = route_label(scope["path"])
        api = route.startswith("/v1/")

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if api:
            self.drain.inflight += 1
        try:
            await self.app(scope, receive, record_status)
        finally:
            if api:
                self.drain.inflight -= 1
            elapsed = time.perf_counter() - start
            state = request_state(scope)
            model = state.get("model", "none")
            key = state.get("key")
            key_id = key.id if key is not None else "none"
            self.metrics.requests.labels(model, key_id, route, status_class(status)).inc()
            if api:
                self.metrics.duration.labels(model, route).observe(elapsed)
                outcome = state.get("outcome")
                access_log.info(
                    "request",
                    extra={
                        "access": {
                            "request_id": state.get("request_id"),
                            "method": scope["method"],
                            "route": route,
                            "status": status,
                            "key_id": key_id,
                            "model": model,
                            "endpoint": getattr(outcome, "endpoint", None),
                            "prompt_tokens": getattr(outcome, "prompt_tokens", None),
                            "completion_tokens": getattr(outcome, "completion_tokens", None),
                            "ttft_s": _round(getattr(outcome, "ttft", None)),
                            "duration_s": _round(elapsed),
                        }
                    },
                )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class AuthMiddleware:
    """Bearer keys on every /v1 route, checked against the hashed keys file."""

    def __init__(self, app: ASGIApp, keystore: KeyStore) -> None:
        self.app = app
        self.keystore = keystore

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        auth = header(scope, b"authorization") or ""
        scheme, _, presented = auth.partition(" ")
        record = self.keystore.lookup(presented.strip()) if scheme.lower() == "bearer" and presented else None
        if record is None:
            message = "Invalid API key." if auth else "Missing API key: send Authorization: Bearer <key>."
            err = Unauthorized(message, headers={"WWW-Authenticate": "Bearer"})
            await error_response(err)(scope, receive, send)
            return
        request_state(scope)["key"] = record
        await self.app(scope, receive, send)
