"""One error hierarchy: a class for every status the gateway sends, each rendered as the OpenAI error envelope."""

from __future__ import annotations

import json
from typing import Any, ClassVar


class GatewayError(Exception):
    """An error answer. Header names are kept lower-case, so a default never misses one spelled otherwise."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = {name.lower(): value for name, value in (headers or {}).items()}

    @property
    def http_status(self) -> int:
        return self.status

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()


class InternalError(GatewayError):
    code = "internal_error"


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class ClientClosed(GatewayError):
    """The client left before the answer: nothing is sent, but the request is counted and logged as 499."""

    status = 499
    type = "client_closed_request"
    code = "client_disconnected"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class Unavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_endpoint"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


class EngineRefused(GatewayError):
    """A 4xx from the engine with no class of its own (422, 409, ...): passed on with the engine's status."""

    type = "invalid_request_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self._status = status

    @property
    def http_status(self) -> int:
        return self._status


_BY_STATUS: dict[int, type[GatewayError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        RequestTimeout,
        PayloadTooLarge,
        RateLimited,
        HeadersTooLarge,
        UpstreamError,
        Unavailable,
        UpstreamTimeout,
    )
}


def from_status(status: int, message: str) -> GatewayError:
    """The error for a status the engine answered with (its 5xx other than 503 become 502)."""
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls(message)
    if 400 <= status < 500:
        return EngineRefused(status, message)
    return UpstreamError(message)


def envelope_bytes(message: str, type_: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
