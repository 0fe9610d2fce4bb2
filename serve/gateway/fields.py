"""Request fields against a model's field policy: allowed names, sizes, sequences, media URLs, the cache salt."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import re
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson

from serve.config.field_policy import (
    GATEWAY_FIELDS,
    OPENAI_CHAT_FIELDS,
    OPENAI_COMPLETION_FIELDS,
    VLLM_CHAT_EXTRAS,
    VLLM_COMPLETION_EXTRAS,
    FieldPolicy,
)
from serve.config.keys import KeyRecord
from serve.gateway.errors import BadRequest

# A media URL that needs its host resolved before the engine may fetch it: (where in the body, host name).
MediaHost = tuple[str, str]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The prompt itself: bounded by the body size, the message count and the context length, not by this policy.
_CONTENT_FIELDS = frozenset({"model", "messages", "prompt"})
# Fields whose entry count is capped, by the FieldPolicy setting that caps it.
_COUNTED = {
    "stop": "max_stop",
    "logit_bias": "max_logit_bias",
    "allowed_token_ids": "max_token_ids",
    "stop_token_ids": "max_token_ids",
    "logprob_token_ids": "max_token_ids",
    "bad_words": "max_bad_words",
    "tools": "max_tools",
}
# Content parts vLLM 0.32 parses as text or as media it fetches or decodes itself.
_PART_TYPES = frozenset(
    {
        "text",
        "input_text",
        "output_text",
        "refusal",
        "thinking",
        "tool_reference",
        "image_url",
        "input_image",
        "audio_url",
        "video_url",
        "input_audio",
    }
)
# Keys vLLM reads a media URL from, whatever the part's type says.
_URL_KEYS = ("image_url", "audio_url", "video_url")
# Tensors the engine would deserialize (vLLM's *_embeds), Python objects, and `uuid`, which names an item of the
# engine's media cache: another tenant's image, for one who guesses or learns its id.
_REFUSED_PART_KEYS = frozenset({"image_embeds", "audio_embeds", "video_embeds", "prompt_embeds", "image_pil", "uuid"})
# Host (a name or an IP literal) and an optional port, nothing else: no user info, no percent-encoding, so that the
# gateway and the engine's URL parser cannot read two different hosts out of one URL.
_AUTHORITY = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def prompt_count(body: dict[str, Any]) -> int:
    """Prompts in a request: a completions batch (strings or token-id lists) counts each; anything else is one."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def per_prompt(body: dict[str, Any]) -> int:
    """Sequences the engine runs for each prompt: n, or best_of when larger (its candidates are generated too)."""
    return max(_count(body.get("n")), _count(body.get("best_of")))


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1


def check_sequences(body: dict[str, Any], cap: int) -> int:
    """The request's sequences (prompts x n, or best_of): refused above the model's cap before anything is counted."""
    prompts, each = prompt_count(body), per_prompt(body)
    sequences = prompts * each
    if sequences > cap:
        label = "best_of" if _count(body.get("best_of")) > _count(body.get("n")) else "n"
        raise BadRequest(
            f"{prompts} prompt{'s' if prompts > 1 else ''} x {label}={each} is {sequences} sequences, more than the "
            f"{cap} this model allows in one request (max_sequences_per_request): send them in several requests",
            param="prompt" if prompts > 1 else label,
            code="too_many_sequences",
        )
    return sequences


def check_fields(body: dict[str, Any], chat: bool, policy: FieldPolicy) -> tuple[MediaHost, ...]:
    """Refuse fields the model does not take and fields past their size; answer the media hosts left to resolve."""
    openai = OPENAI_CHAT_FIELDS if chat else OPENAI_COMPLETION_FIELDS
    extras = VLLM_CHAT_EXTRAS if chat else VLLM_COMPLETION_EXTRAS
    refused = [
        name
        for name in body
        if name not in openai and name != "cache_salt" and not (name in extras and name in policy.allow_extra)
    ]
    if refused:
        owned = [name for name in refused if name in GATEWAY_FIELDS]
        if owned:
            message = f"{', '.join(owned)}: set by the gateway, not by clients"
        else:
            plural = "s" if len(refused) > 1 else ""
            message = f"unsupported request field{plural} for this model: {', '.join(refused)}"
        raise BadRequest(message, param=(owned or refused)[0], code="unsupported_field")
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise BadRequest("cache_salt must be a string", param="cache_salt", code="invalid_type")
    for name, value in body.items():
        if name in _CONTENT_FIELDS or not isinstance(value, str | list | dict):
            continue  # numbers, booleans and null are small
        cap_name = _COUNTED.get(name)
        if cap_name is not None and isinstance(value, list | dict):
            cap: int = getattr(policy, cap_name)
            if len(value) > cap:
                raise BadRequest(
                    f"{name} has {len(value)} entries; this model takes at most {cap}",
                    param=name,
                    code="field_too_large",
                )
        size = _json_size(value)
        if size > policy.max_field_bytes:
            raise BadRequest(
                f"{name} is {size} bytes of JSON; this model takes at most {policy.max_field_bytes} per field",
                param=name,
                code="field_too_large",
            )
    return _media_hosts(body.get("messages"), policy) if chat else ()


def _json_size(value: str | list[Any] | dict[str, Any]) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        return 1 << 62  # nested past what orjson writes (255 levels): no schema or list is that deep


def _media_hosts(messages: Any, policy: FieldPolicy) -> tuple[MediaHost, ...]:
    hosts: dict[str, str] = {}
    if not isinstance(messages, list):
        return ()
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict):
                for where, host in _part_hosts(part, f"messages[{i}].content[{j}]", policy):
                    hosts.setdefault(host, where)
    return tuple((where, host) for host, where in hosts.items())


def _part_hosts(part: dict[str, Any], where: str, policy: FieldPolicy) -> list[MediaHost]:
    refused = sorted(_REFUSED_PART_KEYS.intersection(part))
    kind = part.get("type")
    if refused or (kind is not None and kind not in _PART_TYPES):
        what = refused[0] if refused else kind
        raise BadRequest(
            f"content parts of type {what!r} are not accepted: send text, image_url, audio_url, video_url or "
            "input_audio",
            param=f"{where}.{refused[0] if refused else 'type'}",
            code="unsupported_content",
        )
    if "input_audio" in part and not policy.inline_media:
        raise BadRequest(
            "this model takes no media in the request", param=f"{where}.input_audio", code="media_not_allowed"
        )
    found = []
    for key in _URL_KEYS:
        if key not in part:
            continue
        value = part[key]
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str):
            raise BadRequest(f"{key} must hold a URL string", param=f"{where}.{key}", code="invalid_type")
        host = media_url_host(url, f"{where}.{key}", policy)
        if host is not None:
            found.append((f"{where}.{key}", host))
    return found


def media_url_host(url: str, where: str, policy: FieldPolicy) -> str | None:
    """Refuse a media URL the engine must not fetch; answer its host when only DNS can tell, else None."""
    if url[:5].lower() == "data:":  # vLLM's own test: such a URL is decoded, never fetched
        if policy.inline_media:
            return None
        raise BadRequest("this model takes no media in the request", param=where, code="media_not_allowed")
    if any(ord(c) <= 0x20 or c in "\\\x7f" for c in url):
        raise _not_allowed(where, "a media URL may not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise _not_allowed(where, "the media URL does not parse") from None
    if parts.scheme.lower() not in ("http", "https") or host is None or not _AUTHORITY.match(parts.netloc):
        raise _not_allowed(where, "media URLs must be http(s)://host[:port]/path (no user info), or data: URLs")
    if host not in policy.media_domains:
        if not policy.media_domains:
            raise _not_allowed(where, "this model fetches no media URLs: send the media as a data: URL")
        raise _not_allowed(where, f"media from {host!r} is not allowed for this model")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if not is_public(address):
        raise _not_allowed(where, f"media URL points at a private, loopback or link-local address ({host})")
    return None


def _not_allowed(where: str, message: str) -> BadRequest:
    return BadRequest(message, param=where, code="media_url_not_allowed")


def is_public(address: IPAddress) -> bool:
    """A globally routable unicast address, IPv4 addresses embedded in IPv6 ones included."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address] = []
        if address.ipv4_mapped is not None:
            embedded.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            embedded.append(address.sixtofour)
        if address.teredo is not None:
            embedded.extend(address.teredo)
        if address in _NAT64 or int(address) >> 32 == 0:  # NAT64, and the deprecated IPv4-compatible ::a.b.c.d
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(not is_public(inner) for inner in embedded):
            return False
    return address.is_global and not (
        address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address.is_loopback
        or address.is_link_local
        or address.is_private
    )


async def check_media_hosts(hosts: Sequence[MediaHost], policy: FieldPolicy) -> None:
    """Resolve each media host off the event loop: every address it has must be public, within the timeout."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(policy.resolve_timeout):
            for where, host in hosts:
                try:
                    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
                except OSError:
                    raise _unresolvable(where, host) from None
                for info in infos:
                    address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                    if not is_public(address):
                        raise _not_allowed(
                            where, f"media host {host!r} resolves to a private, loopback or link-local address"
                        )
    except TimeoutError:
        raise _unresolvable(hosts[0][0], ", ".join(host for _, host in hosts)) from None


def _unresolvable(where: str, host: str) -> BadRequest:
    return BadRequest(f"media host {host!r} could not be resolved", param=where, code="media_url_unresolvable")


def cache_salt(key: KeyRecord, secret: str | None, client_salt: str | None) -> str:
    """vLLM's prefix-cache salt for a key: no two keys share one, and no client can produce another key's.

    A client's own salt still partitions its own cache (a load test's fresh salt per run), mixed in after the key.
    """
    return _salt(key.id, key.sha256, secret or "", client_salt or "")


# A pure function of a few strings per key: remembered, since an HMAC costs more than the rest of the field checks.
@functools.lru_cache(maxsize=4096)
def _salt(key_id: str, digest: str, secret: str, client_salt: str) -> str:
    message = f"{key_id}\0{digest}\0{client_salt}".encode("utf-8", "surrogatepass")
    return hmac.new(secret.encode("utf-8", "surrogatepass"), message, hashlib.sha256).hexdigest()
