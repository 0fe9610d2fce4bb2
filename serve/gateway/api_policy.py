"""A model's policy applied to embeddings, Responses API and tokenizer requests (chat and completions: policy.py)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from serve.config.keys import KeyRecord
from serve.config.model_file import ModelFile
from serve.gateway.errors import BadRequest
from serve.gateway.fields import cache_salt
from serve.gateway.policy import Prepared, _positive_int
from serve.gateway.tokens import PromptInfo, TokenCounter

ENCODING_FORMATS = ("float", "base64")
# OpenAI's embeddings fields and vLLM's text-input extras; the rest (chat-style `messages` with media, processor
# kwargs, scheduling priority) stays with the engine's own clients.
EMBEDDING_FIELDS = frozenset(
    {
        "input",
        "model",
        "encoding_format",
        "dimensions",
        "user",
        "truncate_prompt_tokens",
        "add_special_tokens",
        "normalize",
        "cache_salt",
    }
)
# Responses API fields the gateway does not relay: the engine would fetch media or reach tool servers on a
# client's word, or deserialize what it is sent; scheduling priority is the operator's.
REFUSED_RESPONSE_FIELDS = frozenset(
    {"mm_processor_kwargs", "media_io_kwargs", "priority", "prompt", "previous_input_messages"}
)
TEXT_PART_TYPES = frozenset({"input_text", "output_text", "text", "refusal", "reasoning_text", "summary_text"})


def _is_tokens(value: object) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def check_embedding_input(value: object) -> None:
    """A string, a token array, or a non-empty list of either (OpenAI's shapes)."""
    if isinstance(value, str) or _is_tokens(value):
        return
    if isinstance(value, list) and value and all(isinstance(v, str) or _is_tokens(v) for v in value):
        return
    raise BadRequest(
        "input must be a string, an array of strings, an array of token ids or an array of token arrays",
        param="input",
        code="invalid_value",
    )


def _context_check(info: PromptInfo, room: int, model: ModelFile, param: str, asked: int = 0) -> None:
    if info.exact and info.longest > room:
        has = f"at least {info.longest}" if info.lower_bound else str(info.longest)
        more = f" and {asked} more are asked for" if asked else ""
        raise BadRequest(
            f"this model's context is {model.engine.max_model_len} tokens: the input has {has}{more}.",
            param=param,
            code="context_length_exceeded",
        )


def salted(out: dict[str, Any], key: KeyRecord | None, secret: str | None) -> None:
    """The engine's prefix cache partitioned per key, as for chat and completions (serve/gateway/fields.py)."""
    client_salt = out.pop("cache_salt", None)
    if key is not None:
        out["cache_salt"] = cache_salt(key, secret, client_salt if isinstance(client_salt, str) else None)


def prepare_embeddings(
    body: dict[str, Any],
    model: ModelFile,
    counter: TokenCounter,
    exact: bool,
    key: KeyRecord | None = None,
    salt_secret: str | None = None,
) -> Prepared:
    """Input checked and counted (every item must fit the context unless the engine is asked to truncate)."""
    unknown = sorted(set(body) - EMBEDDING_FIELDS)
    if unknown:
        raise BadRequest(f"fields not relayed for embeddings: {', '.join(unknown)}", param=unknown[0])
    if "input" not in body:
        raise BadRequest("input is required", param="input", code="missing_required_parameter")
    check_embedding_input(body["input"])
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ENCODING_FORMATS:
        raise BadRequest(f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}", param="encoding_format")
    _positive_int(body, "dimensions")
    out = {**body, "model": model.name}
    salted(out, key, salt_secret)
    room = model.engine.max_model_len
    info = counter.completion(out["input"], room, exact)
    if out.get("truncate_prompt_tokens") is None:
        _context_check(info, room, model, "input")
    return Prepared(out, stream=False, strip_usage=False, prompt_tokens=info.tokens)


def _response_messages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The input as chat messages the tokenizer's template can count, or None when it is something else."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    for item in given if isinstance(given, list) else ():
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            return None
        content = item.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            return None
        messages.append({"role": item["role"], "content": content})
    return messages


def check_response_shape(body: dict[str, Any]) -> None:
    """Text input and function tools only: media parts, file inputs and hosted tools make the engine fetch."""
    refused = sorted(set(body) & REFUSED_RESPONSE_FIELDS)
    if refused:
        raise BadRequest(f"fields not relayed for responses: {', '.join(refused)}", param=refused[0])
    given = body.get("input")
    for item in given if isinstance(given, list) else ():
        content = item.get("content") if isinstance(item, dict) else None
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in TEXT_PART_TYPES:
                raise BadRequest(f"input parts of type {kind!r} are not relayed (text only)", param="input")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("tools must be an array", param="tools", code="invalid_type")
    for tool in tools or ():
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise BadRequest("only tools of type function are relayed", param="tools")


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def prepare_responses(
    body: dict[str, Any],
    model: ModelFile,
    counter: TokenCounter,
    exact: bool,
    response_id: str,
    key: KeyRecord | None = None,
    salt_secret: str | None = None,
) -> Prepared:
    """`max_output_tokens` capped and defaulted like `max_tokens`, sampling defaults, the gateway's response id."""
    policy = model.policy
    given = body.get("input")
    if not isinstance(given, str | list) or (isinstance(given, list) and not given):
        raise BadRequest("input must be a string or a non-empty array", param="input", code="invalid_value")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("stream must be a boolean", param="stream", code="invalid_type")
    check_response_shape(body)
    out = {**body, "model": model.name}
    salted(out, key, salt_secret)
    asked = _positive_int(out, "max_output_tokens")
    if asked is not None and asked > policy.max_tokens_cap:
        raise BadRequest(
            f"max_output_tokens={asked} is above the cap of {policy.max_tokens_cap} for model {model.name!r}",
            param="max_output_tokens",
            code="max_tokens_above_cap",
        )
    max_tokens = asked or policy.default_max_tokens or policy.max_tokens_cap
    out["max_output_tokens"] = max_tokens
    for name, value in policy.defaults.items():
        out.setdefault(name, value)
    # The id is the gateway's, never the client's: it is what routes retrieve and cancel to this engine.
    out["request_id"] = response_id
    room = model.engine.max_model_len - max_tokens
    messages = _response_messages(out)
    if messages is not None:
        info = counter.chat(messages, room, exact)
    else:
        info = counter.completion(json.dumps(given), room, exact)
    _context_check(info, room, model, "input", max_tokens)
    stream = bool(out.get("stream"))
    return Prepared(out, stream=stream, strip_usage=False, max_tokens=max_tokens, prompt_tokens=info.tokens)


def prepare_tokenizer_call(body: dict[str, Any], model: ModelFile, detokenize: bool) -> Prepared:
    """vLLM's /tokenize (prompt or messages) and /detokenize (tokens): checked for shape, nothing reserved."""
    if detokenize:
        if not _is_tokens(body.get("tokens")):
            raise BadRequest("tokens must be a non-empty array of token ids", param="tokens", code="invalid_value")
    elif not isinstance(body.get("prompt"), str) and not isinstance(body.get("messages"), list):
        raise BadRequest("give prompt (a string) or messages (an array)", param="prompt", code="invalid_value")
    return Prepared({**body, "model": model.name}, stream=False, strip_usage=False)
