"""The request field policy through a real gateway: what is refused never reaches the engine, what is allowed does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve.config.keys import create_key
from tests.integration.conftest import Gateway, gateway_for, model_file
from tests.integration.fake_engine import FakeEngine

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
METADATA_URL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


def post(gw: Gateway, body: dict[str, Any], key: str | None = None, path: str = "/chat/completions") -> httpx.Response:
    return httpx.post(f"{gw.v1}{path}", json=body, headers={"authorization": f"Bearer {key or gw.key}"}, timeout=30)


def image(url: str) -> dict[str, Any]:
    parts = [{"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": url}}]
    return {**CHAT, "messages": [{"role": "user", "content": parts}]}


@pytest.fixture
def gw(tmp_path: Path, fake_engine: tuple[FakeEngine, str]) -> Iterator[tuple[Gateway, str]]:
    """A model with the default field policy, and a second key made before the gateway starts."""
    engine, url = fake_engine
    other, _ = create_key(tmp_path / "keys.yaml", "other")
    with gateway_for(tmp_path, [model_file(tmp_path, "m", url, [])], engine) as gateway:
        yield gateway, other


@pytest.fixture
def media_gw(tmp_path: Path, fake_engine: tuple[FakeEngine, str]) -> Iterator[Gateway]:
    """A model that fetches media from listed hosts and takes structured_outputs."""
    engine, url = fake_engine
    fields = {
        "media_domains": ["localhost", "127.0.0.1", "169.254.169.254"],
        "allow_extra": ["structured_outputs", "top_k"],
    }
    with gateway_for(tmp_path, [model_file(tmp_path, "m", url, [], {"fields": fields})], engine) as gateway:
        yield gateway


@pytest.mark.parametrize(
    "field, value, code",
    [
        ("chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}", "unsupported_field"),
        ("kv_transfer_params", {"remote_host": "10.0.0.1"}, "unsupported_field"),
        ("priority", -100, "unsupported_field"),
        ("request_id", "another-tenants-id", "unsupported_field"),
        ("structured_outputs", {"regex": "(a|aa)+$"}, "unsupported_field"),
        ("guided_grammar", "root ::= x", "unsupported_field"),
        ("stop_token_ids", list(range(5000)), "field_too_large"),
        ("logit_bias", {str(i): -100 for i in range(2000)}, "field_too_large"),
    ],
)
def test_refused_fields_never_reach_the_engine(gw: tuple[Gateway, str], field: str, value: Any, code: str) -> None:
    gateway, _ = gw
    resp = post(gateway, {**CHAT, field: value})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (code, field, "invalid_request_error")
    assert gateway.engine.requests == []


def test_openai_fields_and_default_extras_reach_the_engine(gw: tuple[Gateway, str]) -> None:
    gateway, _ = gw
    body = {**CHAT, "seed": 7, "stop": ["\n"], "top_k": 4, "ignore_eos": True, "user": "u1"}
    assert post(gateway, body).status_code == 200
    sent = gateway.engine.requests[-1]
    assert {k: sent[k] for k in ("seed", "stop", "top_k", "ignore_eos", "user")} == {
        "seed": 7,
        "stop": ["\n"],
        "top_k": 4,
        "ignore_eos": True,
        "user": "u1",
    }


def test_an_extra_the_model_file_allows_reaches_the_engine(media_gw: Gateway) -> None:
    outputs = {"choice": ["yes", "no"]}
    assert post(media_gw, {**CHAT, "structured_outputs": outputs}).status_code == 200
    assert media_gw.engine.requests[-1]["structured_outputs"] == outputs
    # Listing extras replaces the defaults: ignore_eos was not listed.
    assert post(media_gw, {**CHAT, "ignore_eos": True}).json()["error"]["param"] == "ignore_eos"


def assert_media_refused(gateway: Gateway, url: str) -> None:
    resp = post(gateway, image(url))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("media_url_not_allowed", "messages[0].content[1].image_url")
    assert gateway.engine.requests == []


def test_an_image_url_at_the_metadata_service_is_refused(gw: tuple[Gateway, str]) -> None:
    assert_media_refused(gw[0], METADATA_URL)


def test_the_metadata_service_is_refused_even_when_listed(media_gw: Gateway) -> None:
    assert_media_refused(media_gw, METADATA_URL)


def test_a_listed_name_that_resolves_to_loopback_is_refused(media_gw: Gateway) -> None:
    for url in ("http://localhost:9/cat.png", "http://127.0.0.1/cat.png", "http://user@localhost/cat.png"):
        assert_media_refused(media_gw, url)
    assert post(media_gw, image("data:image/png;base64,iVBORw0KGgo=")).status_code == 200


def test_cache_salt_is_the_gateways_per_key(gw: tuple[Gateway, str]) -> None:
    gateway, other = gw
    body = {**CHAT, "cache_salt": "chosen-by-client"}
    for key in (gateway.key, other, gateway.key):
        assert post(gateway, body, key).status_code == 200
    first, second, again = (r["cache_salt"] for r in gateway.engine.requests)
    assert first != second, "two keys share a prefix-cache salt"
    assert first == again, "one key's salt changes between requests"
    assert "chosen-by-client" not in (first, second)
    assert post(gateway, dict(CHAT)).status_code == 200
    unsalted = gateway.engine.requests[-1]["cache_salt"]
    assert unsalted and unsalted != first


def test_a_batch_of_prompts_times_n_is_capped_in_sequences(gw: tuple[Gateway, str]) -> None:
    gateway, _ = gw
    batch = {"model": "m", "prompt": [f"p{i}" for i in range(2000)], "n": 4, "max_tokens": 4}
    resp = post(gateway, batch, path="/completions")
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("too_many_sequences", "prompt")
    assert "8000 sequences" in error["message"] and "16" in error["message"]
    assert gateway.engine.requests == []
    assert post(gateway, {**batch, "prompt": ["a", "b", "c", "d"]}, path="/completions").status_code == 200
    assert len(gateway.engine.requests[-1]["prompt"]) == 4
