"""The request field policy: allowed fields, size caps, sequences per request, media URLs and the cache salt."""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import ipaddress
import socket
import typing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve.config.field_policy import (
    DEFAULT_EXTRAS,
    GATEWAY_FIELDS,
    OPENAI_CHAT_FIELDS,
    OPENAI_COMPLETION_FIELDS,
    VLLM_CHAT_EXTRAS,
    VLLM_COMPLETION_EXTRAS,
    FieldPolicy,
)
from serve.config.keys import KeyRecord
from serve.config.model_file import ModelFile
from serve.gateway.errors import BadRequest
from serve.gateway.fields import cache_salt, check_media_hosts, is_public, media_url_host
from serve.gateway.policy import apply_policy


def model(**policy: Any) -> ModelFile:
    return ModelFile.model_validate(
        {"name": "m", "source": "a/b", "engine": {"max_model_len": 2048}, "policy": {"max_tokens_cap": 64, **policy}}
    )


MODEL = model()
CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION: dict[str, Any] = {"model": "m", "prompt": "hi"}


def key(id_: str = "key_aaaaaa", sha: str = "a") -> KeyRecord:
    return KeyRecord(id=id_, name="t", sha256=sha * 64, created=datetime(2024, 1, 1, tzinfo=UTC))


def refused(body: dict[str, Any], kind: str = "chat", target: ModelFile = MODEL) -> BadRequest:
    with pytest.raises(BadRequest) as err:
        apply_policy(body, target, "chat" if kind == "chat" else "completion")
    return err.value


# The field lists against their sources: openai-python's request types and vLLM 0.32's protocol classes.


def test_openai_fields_are_the_sdks_request_fields() -> None:
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params

    chat = set(typing.get_type_hints(chat_params.CompletionCreateParamsBase)) | {"stream"}
    completion = set(typing.get_type_hints(completion_create_params.CompletionCreateParamsBase)) | {"stream"}
    assert chat == OPENAI_CHAT_FIELDS
    assert completion == OPENAI_COMPLETION_FIELDS


def _vllm_fields(relative: str, cls: str) -> set[str]:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    # Read, not imported: importing vLLM's protocol pulls in torch.
    source = Path(next(iter(spec.submodule_search_locations))) / "entrypoints" / "openai" / relative
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {
                n.target.id
                for n in node.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and not n.target.id.startswith("_")
            }
    raise AssertionError(f"{cls} not found in {source}")


def test_vllm_extras_are_the_installed_vllms_fields_beyond_openai() -> None:
    chat = _vllm_fields("chat_completion/protocol.py", "ChatCompletionRequest")
    completion = _vllm_fields("completion/protocol.py", "CompletionRequest")
    assert chat - OPENAI_CHAT_FIELDS - GATEWAY_FIELDS == VLLM_CHAT_EXTRAS
    assert completion - OPENAI_COMPLETION_FIELDS - GATEWAY_FIELDS == VLLM_COMPLETION_EXTRAS
    assert chat & completion >= GATEWAY_FIELDS


# Which fields pass.


@pytest.mark.parametrize(
    "field, value, kind",
    [
        ("chat_template", "{{ messages }}", "chat"),
        ("chat_template_kwargs", {"enable_thinking": True}, "chat"),
        ("structured_outputs", {"regex": "(a+)+$"}, "chat"),
        ("guided_json", {"type": "object"}, "chat"),
        ("logits_processors", ["x"], "chat"),
        ("vllm_xargs", {"a": 1}, "chat"),
        ("prompt_embeds", "AAAA", "completion"),
        ("use_beam_search", True, "completion"),
        ("best_of", 2, "chat"),
        ("no_such_field", 1, "chat"),
    ],
)
def test_fields_outside_the_allow_list_are_refused_by_name(field: str, value: Any, kind: str) -> None:
    body = {**(CHAT if kind == "chat" else COMPLETION), field: value}
    err = refused(body, kind)
    assert (err.status, err.code, err.param) == (400, "unsupported_field", field)
    assert field in err.message


@pytest.mark.parametrize("field", ["priority", "request_id", "kv_transfer_params", "ec_transfer_params"])
def test_fields_the_gateway_owns_are_refused(field: str) -> None:
    err = refused({**CHAT, field: {} if field.endswith("params") else 1})
    assert (err.code, err.param) == ("unsupported_field", field)
    assert "set by the gateway" in err.message


def test_openai_fields_and_default_extras_pass() -> None:
    body = {
        **CHAT,
        "temperature": 0.2,
        "seed": 3,
        "logprobs": True,
        "top_logprobs": 2,
        "user": "u",
        "metadata": {"a": "b"},
        "stop": ["x"],
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "min_tokens": 2,
        "stop_token_ids": [2],
    }
    out = apply_policy(body, MODEL, "chat").body
    assert {k: out[k] for k in body if k != "model"} == {k: v for k, v in body.items() if k != "model"}
    completion = {**COMPLETION, "echo": True, "suffix": "s", "best_of": 1, "logprobs": 2, "top_k": 3}
    assert apply_policy(completion, MODEL, "completion").body["top_k"] == 3


def test_an_extra_passes_once_the_model_file_allows_it() -> None:
    body = {**CHAT, "structured_outputs": {"choice": ["a", "b"]}}
    assert refused(body).param == "structured_outputs"
    allowing = model(fields={"allow_extra": ["structured_outputs", "chat_template_kwargs"]})
    assert apply_policy(body, allowing, "chat").body["structured_outputs"] == {"choice": ["a", "b"]}
    # The list replaces the defaults: top_k was not listed again.
    assert refused({**CHAT, "top_k": 4}, target=allowing).param == "top_k"
    # A chat-only extra is not a completions field.
    assert refused({**COMPLETION, "chat_template_kwargs": {}}, "completion", allowing).param == "chat_template_kwargs"


@pytest.mark.parametrize(
    "name, says",
    [
        ("priority", "set by the gateway"),
        ("cache_salt", "set by the gateway"),
        ("guided_json", "removed in vLLM 0.32"),
        ("temperature", "always allowed"),
        ("top-k", "not a request field"),
    ],
)
def test_model_file_refuses_extras_it_cannot_allow(name: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        FieldPolicy(allow_extra=[name])


def test_default_extras_are_known_to_both_apis() -> None:
    assert set(DEFAULT_EXTRAS) <= VLLM_CHAT_EXTRAS & VLLM_COMPLETION_EXTRAS
    assert FieldPolicy().allow_extra == list(DEFAULT_EXTRAS)


# Sizes.


@pytest.mark.parametrize(
    "field, value, allow",
    [
        ("stop", [f"s{i}" for i in range(5)], []),
        ("logit_bias", {str(i): 1 for i in range(301)}, []),
        ("allowed_token_ids", list(range(20_000)), ["allowed_token_ids"]),
        ("stop_token_ids", list(range(1025)), []),
        ("bad_words", ["w"] * 65, ["bad_words"]),
        ("tools", [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)], []),
    ],
)
def test_list_fields_past_their_cap_are_refused(field: str, value: Any, allow: list[str]) -> None:
    target = model(fields={"allow_extra": allow or list(DEFAULT_EXTRAS)})
    err = refused({**CHAT, field: value}, target=target)
    assert (err.code, err.param) == ("field_too_large", field)
    # With the cap raised to the list's length the same list passes.
    caps = {"stop": "max_stop", "logit_bias": "max_logit_bias", "bad_words": "max_bad_words", "tools": "max_tools"}
    raised = model(fields={"allow_extra": allow or list(DEFAULT_EXTRAS), caps.get(field, "max_token_ids"): len(value)})
    if field != "allowed_token_ids":  # 20,000 ids are also past max_field_bytes
        apply_policy({**CHAT, field: value}, raised, "chat")


def test_a_schema_past_max_field_bytes_is_refused() -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}
    body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    err = refused(body)
    assert (err.code, err.param) == ("field_too_large", "response_format")
    assert apply_policy(body, model(fields={"max_field_bytes": 1 << 20}), "chat").body["response_format"]
    assert refused({**CHAT, "user": "u" * 70_000}).param == "user"


def test_a_field_nested_too_deep_to_measure_is_a_400() -> None:
    deep: Any = {}
    for _ in range(300):
        deep = {"a": deep}
    assert refused({**CHAT, "metadata": deep}).code == "field_too_large"


# Sequences per request.


def test_a_batch_times_n_past_max_sequences_is_refused_before_counting() -> None:
    body = {**COMPLETION, "prompt": ["p"] * 2000, "n": 4}
    err = refused(body, "completion")
    assert (err.code, err.param) == ("too_many_sequences", "prompt")
    assert "2000 prompts x n=4 is 8000 sequences" in err.message and "16" in err.message
    assert apply_policy({**body, "prompt": ["p"] * 4}, MODEL, "completion").sequences == 16
    # A list of token ids is one prompt.
    assert apply_policy({**COMPLETION, "prompt": [1, 2, 3], "n": 4}, MODEL, "completion").sequences == 4


def test_best_of_counts_its_candidates_in_the_cap_and_the_reservation() -> None:
    target = model(max_n=8, max_sequences_per_request=8)
    err = refused({**COMPLETION, "prompt": ["a", "b"], "n": 1, "best_of": 8}, "completion", target)
    assert (err.code, err.param) == ("too_many_sequences", "prompt")
    prepared = apply_policy({**COMPLETION, "prompt": ["a", "b"], "best_of": 3, "max_tokens": 10}, target, "completion")
    assert prepared.sequences == 6
    assert prepared.reserve_tokens == prepared.prompt_tokens + 60
    single = apply_policy(
        {**COMPLETION, "n": 2, "best_of": 9}, model(max_n=9, max_sequences_per_request=9), "completion"
    )
    assert single.sequences == 9


def test_max_n_above_max_sequences_is_a_model_file_error() -> None:
    with pytest.raises(ValidationError, match="max_sequences_per_request"):
        model(max_n=32)


# Media URLs.


def image(url: str) -> dict[str, Any]:
    parts = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}]
    return {**CHAT, "messages": [{"role": "user", "content": parts}]}


MEDIA = model(fields={"media_domains": ["media.example.com", "169.254.169.254", "8.8.8.8"]})


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://media.example.com@169.254.169.254/x.png",
        "http://[::ffff:169.254.169.254]/x.png",
        "http://2852039166/x.png",
        "file:///etc/passwd",
        "gopher://media.example.com/x",
        "http://media.example.com\\@169.254.169.254/x.png",
        " http://media.example.com/x.png",
        "http://other.example.com/x.png",
        "http://media.example.com%2F@x/",
        "http://[fe80::1/x.png",
    ],
)
def test_media_urls_the_engine_must_not_fetch_are_refused(url: str) -> None:
    err = refused(image(url), target=MEDIA)
    assert (err.code, err.param) == ("media_url_not_allowed", "messages[0].content[1].image_url")


def test_no_media_domain_means_no_url_media_and_data_urls_pass() -> None:
    err = refused(image("https://media.example.com/x.png"))
    assert "data: URL" in err.message
    assert apply_policy(image("data:image/png;base64,AAAA"), MODEL, "chat").media_hosts == ()
    inline_off = model(fields={"inline_media": False})
    assert refused(image("data:image/png;base64,AAAA"), target=inline_off).code == "media_not_allowed"
    audio = {**CHAT, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}
    assert refused(audio, target=inline_off).param == "messages[0].content[0].input_audio"


def test_an_allowed_name_is_left_to_resolve_and_a_public_literal_is_not() -> None:
    body = image("https://Media.Example.com:8443/x.png")
    body["messages"].append({"role": "user", "content": [{"type": "audio_url", "audio_url": "http://8.8.8.8/a.wav"}]})
    prepared = apply_policy(body, MEDIA, "chat")
    assert prepared.media_hosts == (("messages[0].content[1].image_url", "media.example.com"),)


@pytest.mark.parametrize(
    "part, param",
    [
        ({"type": "image_embeds", "image_embeds": "AAAA"}, "messages[0].content[0].image_embeds"),
        ({"image_embeds": "AAAA"}, "messages[0].content[0].image_embeds"),
        ({"type": "image_url", "image_url": None, "uuid": "their-image"}, "messages[0].content[0].uuid"),
        ({"type": "prompt_embeds", "data": "AAAA"}, "messages[0].content[0].type"),
        ({"type": "file", "file": {"file_id": "f"}}, "messages[0].content[0].type"),
    ],
)
def test_parts_that_deserialize_tensors_or_reach_the_media_cache_are_refused(part: dict[str, Any], param: str) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": [part]}]}
    err = refused(body, target=MEDIA)
    assert (err.code, err.param) == ("unsupported_content", param)


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "127.0.0.1",
        "127.8.8.8",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "::1",
        "::",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "2002:a9fe:a9fe::1",
        "64:ff9b::a9fe:a9fe",
        "::a9fe:a9fe",
    ],
)
def test_private_loopback_and_link_local_addresses_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


def test_global_addresses_are_public() -> None:
    assert all(is_public(ipaddress.ip_address(a)) for a in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"))
    assert media_url_host("http://8.8.8.8/x", "p", MEDIA.policy.fields) is None


def test_a_host_name_resolving_to_loopback_is_refused() -> None:
    fields = FieldPolicy(media_domains=["localhost"])
    with pytest.raises(BadRequest) as err:
        asyncio.run(check_media_hosts([("messages[0].content[0].image_url", "localhost")], fields))
    assert (err.value.code, err.value.param) == ("media_url_not_allowed", "messages[0].content[0].image_url")


def resolving(answer: Any) -> Any:
    """A stand-in for the loop's getaddrinfo: the tests never ask a real resolver about a name outside."""

    async def getaddrinfo(host: str, port: Any, **_: Any) -> Any:
        if isinstance(answer, BaseException):
            raise answer
        if answer == "hang":
            await asyncio.sleep(60)
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in answer]

    return getaddrinfo


def run_check(answer: Any, timeout: float = 2.0) -> None:
    async def main() -> None:
        asyncio.get_running_loop().getaddrinfo = resolving(answer)  # type: ignore[method-assign]
        fields = FieldPolicy(media_domains=["media.example.com"], resolve_timeout=timeout)
        await check_media_hosts([("p", "media.example.com")], fields)

    asyncio.run(main())


def test_every_resolved_address_must_be_public() -> None:
    run_check(["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
    with pytest.raises(BadRequest, match="private"):
        run_check(["93.184.215.14", "10.0.0.7"])
    with pytest.raises(BadRequest, match="private"):
        run_check(["fe80::1%eth0"])


def test_a_name_that_does_not_resolve_in_time_is_refused() -> None:
    with pytest.raises(BadRequest) as err:
        run_check(socket.gaierror(socket.EAI_NONAME, "unknown"))
    assert err.value.code == "media_url_unresolvable"
    with pytest.raises(BadRequest) as err:
        run_check("hang", timeout=0.05)
    assert err.value.code == "media_url_unresolvable"


def test_media_domains_must_be_host_names() -> None:
    for bad in ("https://media.example.com", "media.example.com/x", "media.example.com:443", ""):
        with pytest.raises(ValidationError):
            FieldPolicy(media_domains=[bad])
    assert FieldPolicy(media_domains=["Media.Example.COM"]).media_domains == ["media.example.com"]


# The prefix-cache salt.


def test_cache_salt_is_per_key_and_replaces_the_clients() -> None:
    a, b = key("key_aaaaaa", "a"), key("key_bbbbbb", "b")
    out_a = apply_policy({**CHAT, "cache_salt": "mine"}, MODEL, "chat", key=a, salt_secret="s").body
    out_b = apply_policy({**CHAT, "cache_salt": "mine"}, MODEL, "chat", key=b, salt_secret="s").body
    assert out_a["cache_salt"] != out_b["cache_salt"]
    assert "mine" not in (out_a["cache_salt"], out_b["cache_salt"])
    plain_a = apply_policy(dict(CHAT), MODEL, "chat", key=a, salt_secret="s").body["cache_salt"]
    assert plain_a != out_a["cache_salt"], "a client's salt partitions its own cache"
    assert plain_a == cache_salt(a, "s", None) == cache_salt(a, "s", "")
    assert cache_salt(a, "other secret", None) != plain_a
    # vLLM takes at most 128 characters and none of @ / \ NUL.
    assert len(plain_a) <= 128 and not set(plain_a) & set("@/\\\0")


def test_without_a_key_a_clients_cache_salt_is_dropped() -> None:
    assert "cache_salt" not in apply_policy({**CHAT, "cache_salt": "x"}, MODEL, "chat").body
    assert refused({**CHAT, "cache_salt": 5}).code == "invalid_type"
