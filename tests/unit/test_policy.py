"""A model's policy applied to request bodies."""

from __future__ import annotations

from typing import Any

import pytest

from serve.config.keys import KeyRecord
from serve.config.model_file import ModelFile
from serve.gateway.errors import BadRequest, NotFound
from serve.gateway.policy import apply_policy, check_access

MODEL = ModelFile.model_validate(
    {
        "name": "served",
        "aliases": ["alias"],
        "source": "a/b",
        "engine": {"max_model_len": 2048},
        "policy": {"max_tokens_cap": 100, "default_max_tokens": 20, "defaults": {"temperature": 0.5}},
    }
)
CHAT: dict[str, Any] = {"model": "alias", "messages": [{"role": "user", "content": "hi"}]}


def test_alias_becomes_served_name_and_defaults_fill_in() -> None:
    out = apply_policy(dict(CHAT), MODEL, "chat")
    assert out.body["model"] == "served"
    assert out.body["max_tokens"] == 20
    assert out.body["temperature"] == 0.5
    assert not out.stream


def test_client_values_win_over_defaults_and_unknown_fields_pass_through() -> None:
    body = {**CHAT, "temperature": 0, "max_tokens": 100, "tools": [{"type": "function"}], "logprobs": True}
    out = apply_policy(body, MODEL, "chat").body
    assert out["temperature"] == 0
    assert out["max_tokens"] == 100
    assert out["tools"] == [{"type": "function"}]
    assert out["logprobs"] is True


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_above_cap_is_400(field: str) -> None:
    with pytest.raises(BadRequest, match="above the cap of 100") as err:
        apply_policy({**CHAT, field: 101}, MODEL, "chat")
    assert err.value.param == field


@pytest.mark.parametrize("value", [0, -1, "5", 1.5, True])
def test_max_tokens_must_be_positive_int(value: object) -> None:
    with pytest.raises(BadRequest, match="positive integer"):
        apply_policy({**CHAT, "max_tokens": value}, MODEL, "chat")


def test_stream_asks_engine_for_usage_and_remembers_whether_client_did() -> None:
    out = apply_policy({**CHAT, "stream": True}, MODEL, "chat")
    assert out.stream and out.strip_usage
    assert out.body["stream_options"] == {"include_usage": True}
    asked = apply_policy({**CHAT, "stream": True, "stream_options": {"include_usage": True}}, MODEL, "chat")
    assert not asked.strip_usage


@pytest.mark.parametrize(
    "body, message",
    [
        ({"model": "alias"}, "messages must be a non-empty array"),
        ({"model": "alias", "messages": []}, "messages must be a non-empty array"),
        ({"model": "alias", "messages": ["hi"]}, "each message must be an object"),
        ({**CHAT, "stream": "yes"}, "stream must be a boolean"),
        ({**CHAT, "stream_options": 3}, "stream_options must be an object"),
    ],
)
def test_bad_shapes_are_400(body: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        apply_policy(body, MODEL, "chat")


def test_completion_needs_prompt() -> None:
    with pytest.raises(BadRequest, match="prompt is required"):
        apply_policy({"model": "alias"}, MODEL, "completion")
    assert apply_policy({"model": "alias", "prompt": "x"}, MODEL, "completion").body["model"] == "served"


def test_key_model_allow_list() -> None:
    base = {"id": "key_abcdef", "name": "n", "sha256": "0" * 64, "created": "2026-01-01T00:00:00Z"}
    check_access(KeyRecord.model_validate(base), MODEL, "alias")
    check_access(KeyRecord.model_validate({**base, "models": ["alias"]}), MODEL, "served")
    # Not the key's model: the same answer as a model that does not exist.
    with pytest.raises(NotFound, match="does not exist") as err:
        check_access(KeyRecord.model_validate({**base, "models": ["other"]}), MODEL, "served")
    assert err.value.code == "model_not_found"
