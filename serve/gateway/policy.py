"""A model's policy applied to a request body: served name, max_tokens cap, default sampling, usage on streams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from serve.config.keys import KeyRecord
from serve.config.model_file import ModelFile
from serve.gateway.errors import BadRequest, Forbidden

Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class Prepared:
    body: dict[str, Any]
    stream: bool
    # The client did not ask for the usage chunk: the gateway asked for it (to count tokens) and drops it.
    strip_usage: bool


def _positive_int(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"{field} must be a positive integer", param=field, code="invalid_value")
    return value


def check_shape(body: dict[str, Any], kind: Kind) -> None:
    """Type checks the gateway itself depends on; everything else is vLLM's to validate."""
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty array", param="messages", code="invalid_value")
        if not all(isinstance(m, dict) for m in messages):
            raise BadRequest("each message must be an object", param="messages", code="invalid_value")
    elif "prompt" not in body:
        raise BadRequest("prompt is required", param="prompt", code="missing_required_parameter")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("stream must be a boolean", param="stream", code="invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", param="stream_options", code="invalid_type")


def check_access(key: KeyRecord | None, model: ModelFile, requested: str) -> None:
    if key is not None and key.models and not set(key.models) & set(model.names):
        raise Forbidden(f"this API key may not use the model {requested!r}", param="model")


def apply_policy(body: dict[str, Any], model: ModelFile, kind: Kind) -> Prepared:
    check_shape(body, kind)
    policy = model.policy
    out = dict(body)
    out["model"] = model.name
    asked = [f for f in ("max_tokens", "max_completion_tokens") if _positive_int(out, f) is not None]
    for field in asked:
        if out[field] > policy.max_tokens_cap:
            raise BadRequest(
                f"{field}={out[field]} is above the cap of {policy.max_tokens_cap} for model {model.name!r}",
                param=field,
                code="max_tokens_above_cap",
            )
    if not asked:
        out["max_tokens"] = policy.default_max_tokens or policy.max_tokens_cap
    for name, value in policy.defaults.items():
        out.setdefault(name, value)
    stream = bool(out.get("stream", False))
    strip_usage = False
    if stream:
        options = dict(out.get("stream_options") or {})
        strip_usage = not options.get("include_usage", False)
        options["include_usage"] = True
        out["stream_options"] = options
    return Prepared(body=out, stream=stream, strip_usage=strip_usage)
