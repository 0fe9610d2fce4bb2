"""The gateway's OpenAPI document: the request bodies it accepts (it parses bodies itself, under a size limit)."""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1},
    "max_tokens": {"type": "integer", "minimum": 1},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "n": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "seed": {"type": "integer"},
}

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        **_COMMON,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
                    "content": {"type": "string"},
                },
            },
        },
        "max_completion_tokens": {"type": "integer", "minimum": 1},
    },
}

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **_COMMON,
        "prompt": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            ]
        },
    },
}


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _operation(summary: str, request: dict[str, Any] | None = None, secured: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK"},
            "default": {"description": "An error", "content": {"application/json": {"schema": _ERROR}}},
        },
    }
    if request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": request}}}
    if secured:
        op["security"] = [{"bearer": []}]
    return op


def openapi_document(model_names: list[str]) -> dict[str, Any]:
    """The document for these served names (the `model` field is an enum of them)."""
    model = {"type": "string", "enum": model_names}
    chat = {**CHAT_REQUEST, "properties": {**CHAT_REQUEST["properties"], "model": model}}
    completion = {**COMPLETION_REQUEST, "properties": {**COMPLETION_REQUEST["properties"], "model": model}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmserve gateway", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/chat/completions": {"post": _operation("Chat completion, streamed or not", chat)},
            "/v1/completions": {"post": _operation("Text completion, streamed or not", completion)},
            "/v1/models": {"get": _operation("Models this key may use")},
            "/healthz": {"get": _operation("The gateway process is alive", secured=False)},
            "/readyz": {"get": _operation("Every model has a healthy engine", secured=False)},
        },
    }
