"""The stages every request passes, in order: request id -> (metrics and access log) -> header limit -> auth.

They are plain functions the gateway's entry calls in that order (serve.gateway.app), not wrapping layers: each
stage either lets the request on or raises a GatewayError, which the entry renders, counts and logs like any other.
"""

from __future__ import annotations

import logging
import os
import re
import time

from serve.config.keys import KeyRecord
from serve.gateway.asgi import Scope
from serve.gateway.context import RequestContext
from serve.gateway.errors import HeadersTooLarge, Unauthorized
from serve.gateway.keystore import KeyStore
from serve.gateway.metrics import GatewayMetrics, status_class

access_log = logging.getLogger("serve.gateway.access")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_request_id() -> str:
    # 128 random bits as 32 hex digits, as uuid4().hex gives, without building a UUID per request.
    return os.urandom(16).hex()


def client_request_id(incoming: bytes | None) -> str | None:
    """A well-formed X-Request-Id as the client sent it, else None."""
    if incoming is not None:
        text = incoming.decode("latin-1")
        if _VALID_REQUEST_ID.match(text):
            return text
    return None


def check_head(scope: Scope, max_bytes: int) -> None:
    size = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
    if size > max_bytes:
        raise HeadersTooLarge(f"request headers are larger than {max_bytes} bytes")


def authenticate(authorization: bytes | None, keystore: KeyStore) -> KeyRecord:
    """The key a Bearer header presents, or 401."""
    if authorization is not None:
        scheme, _, presented = authorization.decode("latin-1").partition(" ")
        presented = presented.strip()
        if scheme.lower() == "bearer" and presented:
            record = keystore.lookup(presented)
            if record is not None:
                return record
    message = "Invalid API key." if authorization else "Missing API key: send Authorization: Bearer <key>."
    raise Unauthorized(message, headers={"www-authenticate": "Bearer"})


def record(ctx: RequestContext, metrics: GatewayMetrics, method: str, api: bool) -> None:
    """Count the request and write its access log line, from what its context says happened."""
    elapsed = time.perf_counter() - ctx.start
    key_id = ctx.key.id if ctx.key is not None else "none"
    metrics.requests.labels(ctx.model, key_id, ctx.route, status_class(ctx.status)).inc()
    if not api:
        return
    metrics.duration.labels(ctx.model, ctx.route).observe(elapsed)
    if access_log.isEnabledFor(logging.INFO):
        access_log.info(
            "request",
            extra={
                "access": {
                    "request_id": ctx.id,
                    "client_request_id": ctx.client_request_id,
                    "client": ctx.client,
                    "method": method,
                    "route": ctx.route,
                    "status": ctx.status,
                    "failure": ctx.failure,
                    "key_id": key_id,
                    "model": ctx.model,
                    "endpoint": ctx.endpoint,
                    "prompt_tokens": ctx.prompt_tokens,
                    "completion_tokens": ctx.completion_tokens,
                    "queue_wait_s": _round(ctx.queue_wait),
                    "ttft_s": _round(ctx.ttft),
                    "duration_s": _round(elapsed),
                }
            },
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
