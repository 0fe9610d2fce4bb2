"""A model's policy applied to a request body: served name, max_tokens cap, default sampling, usage on streams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from serve.config.keys import KeyRecord
from serve.config.model_file import ModelFile, Policy
from serve.gateway.errors import BadRequest, NotFound
from serve.gateway.fields import MediaHost, cache_salt, check_fields, check_sequences, per_prompt, prompt_count
from serve.gateway.tokens import TokenCounter

Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class Prepared:
    body: dict[str, Any]
    stream: bool
    # The client did not ask for the usage chunk: the gateway asked for it (to count tokens) and drops it.
    strip_usage: bool
    max_tokens: int = 0
    prompt_tokens: int = 0
    # Routing key for session or prefix affinity; None routes to the least loaded endpoint.
    affinity: str | None = None
    # Completions may carry a batch of prompts; each gets max_tokens (times n).
    prompts: int = 1
    # Media URLs whose host names must resolve to public addresses before an engine may fetch them.
    media_hosts: tuple[MediaHost, ...] = ()

    @property
    def sequences(self) -> int:
        """Sequences the engine generates: every prompt of the batch times n (best_of when larger)."""
        return self.prompts * per_prompt(self.body)

    @property
    def reserve_tokens(self) -> int:
        """Tokens this request may use at most: what a tokens-per-minute budget reserves at admission."""
        return self.prompt_tokens + self.max_tokens * self.sequences


def _positive_int(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"{field} must be a positive integer", param=field, code="invalid_value")
    return value


def check_shape(body: dict[str, Any], kind: Kind, policy: Policy) -> None:
    """Type checks and size limits the gateway itself depends on; everything else is vLLM's to validate."""
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty array", param="messages", code="invalid_value")
        if not all(isinstance(m, dict) for m in messages):
            raise BadRequest("each message must be an object", param="messages", code="invalid_value")
        if len(messages) > policy.max_messages:
            raise BadRequest(
                f"{len(messages)} messages is more than the {policy.max_messages} allowed",
                param="messages",
                code="too_many_messages",
            )
    elif "prompt" not in body:
        raise BadRequest("prompt is required", param="prompt", code="missing_required_parameter")
    elif not _prompt_shape(body["prompt"]):
        raise BadRequest(
            "prompt must be a string, an array of strings, an array of token ids or an array of such arrays",
            param="prompt",
            code="invalid_type",
        )
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("stream must be a boolean", param="stream", code="invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", param="stream_options", code="invalid_type")
    for field in ("n", "best_of"):
        value = _positive_int(body, field)
        if value is not None and value > policy.max_n:
            raise BadRequest(f"{field}={value} is above the limit of {policy.max_n}", param=field, code="n_too_large")


def _token_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompt_shape(prompt: object) -> bool:
    """The prompt forms the OpenAI API has; anything nested deeper is refused before it is walked."""
    if isinstance(prompt, str) or _token_ids(prompt):
        return True
    if not isinstance(prompt, list) or not prompt:
        return False
    return all(isinstance(p, str) for p in prompt) or all(_token_ids(p) and p for p in prompt)


def check_access(key: KeyRecord | None, model: ModelFile, requested: str) -> None:
    """A model the key may not use answers exactly as one that does not exist: a key learns nothing of others'."""
    if key is not None and key.models and not set(key.models) & set(model.names):
        raise NotFound(f"The model {requested!r} does not exist.", param="model", code="model_not_found")


def apply_policy(
    body: dict[str, Any],
    model: ModelFile,
    kind: Kind,
    counter: TokenCounter | None = None,
    session: str | None = None,
    exact: bool = True,
    key: KeyRecord | None = None,
    salt_secret: str | None = None,
) -> Prepared:
    """The body to forward and what admission needs to know of it.

    `exact=False` says that nothing needs the prompt's exact token count (the key has no tokens-per-minute limit
    and routing does not hash the prompt): a prompt that clearly fits the context is then not tokenized.
    With a `key`, the engine's prefix cache is salted for that key (HMAC with `salt_secret`); a client's own
    `cache_salt` never reaches the engine as sent.
    """
    policy = model.policy
    check_shape(body, kind, policy)
    media_hosts = check_fields(body, kind == "chat", policy.fields)
    check_sequences(body, policy.max_sequences_per_request)
    out = dict(body)
    out["model"] = model.name
    client_salt = out.pop("cache_salt", None)
    if key is not None:
        out["cache_salt"] = cache_salt(key, salt_secret, client_salt)
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
    max_tokens = max(int(out.get(f) or 0) for f in ("max_tokens", "max_completion_tokens"))
    for name, value in policy.defaults.items():
        out.setdefault(name, value)
    stream = bool(out.get("stream", False))
    strip_usage = False
    if stream:
        options = dict(out.get("stream_options") or {})
        strip_usage = not options.get("include_usage", False)
        options["include_usage"] = True
        out["stream_options"] = options
    prompt_tokens, affinity = 0, None
    if counter is not None:
        room = model.engine.max_model_len - max_tokens
        exact = exact or policy.routing.policy == "prefix_affinity"
        if kind == "chat":
            info = counter.chat(out["messages"], room, exact)
        else:
            info = counter.completion(out["prompt"], room, exact)
        if info.exact and info.longest > room:
            has = f"at least {info.longest}" if info.lower_bound else str(info.longest)
            raise BadRequest(
                f"this model's context is {model.engine.max_model_len} tokens: the prompt has {has} "
                f"and max_tokens asks for {max_tokens} more. Shorten the prompt or lower max_tokens.",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        prompt_tokens = info.tokens
        if policy.routing.policy == "prefix_affinity":
            affinity = info.prefix_key
    if policy.routing.policy == "session_affinity":
        affinity = session
    return Prepared(out, stream, strip_usage, max_tokens, prompt_tokens, affinity, prompt_count(out), media_hosts)
