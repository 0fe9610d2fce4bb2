"""Pure ASGI middleware, outermost first: request id -> metrics and access log -> auth."""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.gateway.errors import Unauthorized, error_response
from serve.gateway.keystore import KeyStore
from serve.gateway.metrics import GatewayMetrics, route_label, status_class

log = logging.getLogger("serve.gateway.access")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def request_state(scope: Scope) -> dict[str, Any]:
    state: dict[str, Any] = scope.setdefault("state", {})
    return state


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


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
    """Counts every response by model, route template and status class, and writes one access log line."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            elapsed = time.perf_counter() - start
            state = request_state(scope)
            model = state.get("model", "none")
            route = route_label(scope["path"])
            self.metrics.requests.labels(model, route, status_class(status)).inc()
            if route.startswith("/v1/"):
                self.metrics.duration.labels(model, route).observe(elapsed)
                key = state.get("key")
                log.info(
                    "%s %s status=%d model=%s key=%s duration=%.3fs",
                    scope["method"],
                    route,
                    status,
                    model,
                    key.id if key is not None else "-",
                    elapsed,
                )


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
