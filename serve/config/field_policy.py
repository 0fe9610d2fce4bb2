"""The model file's request field policy: which request fields reach the engine, how large, and media from where."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from serve.config.loader import Strict

# The request fields of OpenAI's API reference (openai-python's CompletionCreateParams, `stream` included). vLLM
# ignores those it does not implement (audio, metadata, store, ...), so passing them costs the engine nothing.
OPENAI_CHAT_FIELDS = frozenset(
    {
        "messages",
        "model",
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "metadata",
        "modalities",
        "moderation",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    }
)
OPENAI_COMPLETION_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "best_of",
        "echo",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "n",
        "presence_penalty",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "suffix",
        "temperature",
        "top_p",
        "user",
    }
)

# vLLM 0.32's request fields beyond OpenAI's (ChatCompletionRequest and CompletionRequest in
# vllm/entrypoints/openai/*/protocol.py), less those the gateway owns (GATEWAY_FIELDS).
VLLM_CHAT_EXTRAS = frozenset(
    {
        "add_generation_prompt",
        "add_special_tokens",
        "allowed_token_ids",
        "bad_words",
        "chat_template",
        "chat_template_kwargs",
        "continue_final_message",
        "documents",
        "echo",
        "ignore_eos",
        "include_reasoning",
        "include_stop_str_in_output",
        "length_penalty",
        "logprob_token_ids",
        "media_io_kwargs",
        "min_p",
        "min_tokens",
        "mm_payload",
        "mm_processor_kwargs",
        "prompt_logprobs",
        "repetition_detection",
        "repetition_penalty",
        "return_mm_kwargs",
        "return_prompt_text",
        "return_token_ids",
        "return_token_offsets",
        "return_tokens_as_token_ids",
        "routed_experts_prompt_start",
        "session_id",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "stop_token_ids",
        "stream_interval",
        "structured_outputs",
        "thinking_token_budget",
        "top_k",
        "truncate_prompt_tokens",
        "truncation_side",
        "use_beam_search",
        "vllm_xargs",
        "watermarking",
    }
)
VLLM_COMPLETION_EXTRAS = frozenset(
    {
        "add_special_tokens",
        "allowed_token_ids",
        "bad_words",
        "ignore_eos",
        "include_stop_str_in_output",
        "length_penalty",
        "logprob_token_ids",
        "min_p",
        "min_tokens",
        "mm_payload",
        "prompt_embeds",
        "prompt_logprobs",
        "repetition_detection",
        "repetition_penalty",
        "response_format",
        "return_mm_kwargs",
        "return_token_ids",
        "return_token_offsets",
        "return_tokens_as_token_ids",
        "routed_experts_prompt_start",
        "session_id",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "stop_token_ids",
        "stream_interval",
        "structured_outputs",
        "thinking_token_budget",
        "top_k",
        "truncate_prompt_tokens",
        "truncation_side",
        "use_beam_search",
        "vllm_xargs",
        "watermarking",
    }
)

# vLLM fields a client never sets. cache_salt is derived per key (a client's value only partitions its own cache);
# priority is the scheduler's to set from the key's class; an engine request id chosen by a client could collide
# with another tenant's; the transfer parameters address other engines' caches.
GATEWAY_FIELDS = frozenset({"cache_salt", "priority", "request_id", "kv_transfer_params", "ec_transfer_params"})

# Fields vLLM 0.32 removed and silently ignores: allowing one would promise constrained output that never happens.
REMOVED_FIELDS = frozenset(
    {
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_decoding_backend",
        "guided_whitespace_pattern",
    }
)

# Sampling extras whose cost max_tokens already bounds: on unless a model file's allow_extra says otherwise.
DEFAULT_EXTRAS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
)

_HOST = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


class FieldPolicy(Strict):
    """Which request fields reach the engine and how large they may be; where media may come from."""

    # vLLM extras clients may send, on top of the OpenAI fields. Replaces the default list when given.
    allow_extra: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTRAS))
    # Stop strings (vLLM's VLLM_MAX_STOP_STRINGS and OpenAI both allow 4).
    max_stop: int = Field(default=4, ge=0)
    # Entries of logit_bias (each one is applied at every generated token).
    max_logit_bias: int = Field(default=300, ge=0)
    # Entries of each token-id list: allowed_token_ids, stop_token_ids, logprob_token_ids.
    max_token_ids: int = Field(default=1024, ge=0)
    max_bad_words: int = Field(default=64, ge=0)
    max_tools: int = Field(default=128, ge=0)
    # The JSON size of any one field other than messages and prompt (schemas, grammars, tools, stop strings...).
    max_field_bytes: int = Field(default=64 * 1024, gt=0)
    # Host names media URLs (image_url, audio_url, video_url) may point at, as vLLM's --allowed-media-domains
    # (exact names). Empty: no URL media. Private, loopback and link-local addresses are refused whatever the list.
    media_domains: list[str] = Field(default_factory=list)
    # Media carried in the request itself: data: URLs and input_audio parts.
    inline_media: bool = True
    # Seconds to resolve a media host name before the request is refused.
    resolve_timeout: float = Field(default=2.0, gt=0)

    @field_validator("allow_extra")
    @classmethod
    def _known_extras(cls, names: list[str]) -> list[str]:
        for name in names:
            if name in GATEWAY_FIELDS:
                raise ValueError(f"{name} is set by the gateway, never by a client")
            if name in REMOVED_FIELDS:
                raise ValueError(f"{name} was removed in vLLM 0.32 (it is ignored): allow structured_outputs instead")
            if name in VLLM_CHAT_EXTRAS | VLLM_COMPLETION_EXTRAS:
                continue
            if name in OPENAI_CHAT_FIELDS | OPENAI_COMPLETION_FIELDS:
                raise ValueError(f"{name} is an OpenAI field: it is always allowed")
            raise ValueError(f"{name} is not a request field of vLLM 0.32")
        return names

    @field_validator("media_domains")
    @classmethod
    def _host_names(cls, hosts: list[str]) -> list[str]:
        out = []
        for host in hosts:
            name = host.lower()
            if not _HOST.match(name):
                raise ValueError(f"{host!r} is not a host name (write example.com, no scheme, port or path)")
            out.append(name)
        return out
