"""The gateway over real HTTP: auth, routing, policy and every error in the OpenAI envelope."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from serve.config.keys import create_key
from serve.gateway.errors import Forbidden
from tests.integration.conftest import ENGINE_KEY, Gateway, gateway_for, model_file
from tests.integration.fake_engine import FakeEngine
from tests.metrics_text import metric_sum


def client(gw: Gateway, key: str | None = None) -> OpenAI:
    return OpenAI(base_url=gw.v1, api_key=key or gw.key, max_retries=0)


def assert_envelope(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


def test_chat_is_forwarded_with_policy_and_internal_key(gateway: Gateway) -> None:
    answer = client(gateway).chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "tok0 tok1 tok2 "
    sent = gateway.engine.requests[-1]
    assert sent["model"] == "fake-model"
    assert sent["max_tokens"] == 16 and sent["temperature"] == 0.3
    headers = gateway.engine.headers[-1]
    assert headers["authorization"] == f"Bearer {ENGINE_KEY}"
    assert gateway.key not in str(headers)


def test_completions_route(gateway: Gateway) -> None:
    answer = client(gateway).completions.create(model="fake-model", prompt="x", max_tokens=5)
    assert answer.usage is not None and answer.usage.prompt_tokens == 7
    assert gateway.engine.requests[-1]["max_tokens"] == 5


def test_models_lists_names_and_aliases(gateway: Gateway) -> None:
    ids = {m.id for m in client(gateway).models.list()}
    assert ids == {"fake-model", "fake", "dead-model"}


def test_key_limited_to_a_model(gateway: Gateway) -> None:
    limited, _ = create_key(gateway.keys_path, "limited", models=["fake"])
    deadline = time.monotonic() + 10
    while True:  # the gateway picks up the changed keys file on its own
        try:
            ids = {m.id for m in client(gateway, limited).models.list()}
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, "new key not picked up"
            time.sleep(0.2)
    assert ids == {"fake-model", "fake"}
    # A model the key may not use answers exactly as one that does not exist.
    hidden = httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": "dead-model", "messages": [{"role": "user", "content": "x"}]},
        headers={"authorization": f"Bearer {limited}"},
    )
    unknown = httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
        headers={"authorization": f"Bearer {limited}"},
    )
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json()["error"]["message"].replace("dead-model", "X") == unknown.json()["error"]["message"].replace(
        "no-such-model", "X"
    )


def test_wrong_and_missing_key_are_401_envelopes(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        client(gateway, "sk-wrong").models.list()
    assert err.value.status_code == 401
    for headers in ({}, {"authorization": "Bearer"}, {"authorization": f"Basic {gateway.key}"}):
        resp = httpx.post(f"{gateway.v1}/chat/completions", json={}, headers=headers)
        assert_envelope(resp, 401, "invalid_api_key")
        assert resp.headers["www-authenticate"] == "Bearer"
    assert gateway.engine.requests == []


def test_unknown_model_is_404(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(gateway).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_found"
    assert gateway.engine.requests == []


@pytest.mark.parametrize(
    "content, status, code",
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'{"messages": []}', 400, "missing_required_parameter"),
        (b'{"model": "fake", "messages": "hi"}', 400, "invalid_value"),
        (
            b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 101}',
            400,
            "max_tokens_above_cap",
        ),
        (
            b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            400,
            "invalid_type",
        ),
        (
            b'{"model": "fake", "messages": [{"role": "user", "content": "' + b"x" * 70000 + b'"}]}',
            413,
            "request_too_large",
        ),
        (b'{"model": "fake", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid_json"),
    ],
    ids=["bad-json", "not-object", "no-model", "messages-type", "above-cap", "stream-type", "too-large", "too-deep"],
)
def test_bad_requests_never_reach_the_engine(gateway: Gateway, content: bytes, status: int, code: str) -> None:
    resp = httpx.post(
        f"{gateway.v1}/chat/completions",
        content=content,
        headers={"authorization": f"Bearer {gateway.key}", "content-type": "application/json"},
    )
    assert_envelope(resp, status, code)
    assert gateway.engine.requests == []


def test_unknown_route_and_method_are_envelopes(gateway: Gateway) -> None:
    auth = {"authorization": f"Bearer {gateway.key}"}
    assert_envelope(httpx.get(f"{gateway.v1}/nothing", headers=auth), 404)
    assert_envelope(httpx.get(f"{gateway.v1}/chat/completions", headers=auth), 405)


@pytest.mark.parametrize("upstream, expected", [(500, 502), (400, 400), (503, 503)])
def test_engine_errors_become_envelopes(gateway: Gateway, upstream: int, expected: int) -> None:
    gateway.engine.mode, gateway.engine.status = "status", upstream
    resp = httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": "x"}]},
        headers={"authorization": f"Bearer {gateway.key}"},
    )
    error = assert_envelope(resp, expected)
    assert f"fake says {upstream}" in str(error["message"])


def test_dead_engine_is_503_with_retry_after(gateway: Gateway) -> None:
    resp = httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": "dead-model", "messages": [{"role": "user", "content": "x"}]},
        headers={"authorization": f"Bearer {gateway.key}"},
    )
    assert_envelope(resp, 503)
    assert resp.headers["retry-after"] == "1"


def test_health_and_readiness(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    # dead-model has no live engine: the gateway is not ready.
    ready = httpx.get(f"{gateway.url}/readyz")
    assert_envelope(ready, 503, "not_ready")
    # Readiness names no model (unauthenticated callers learn only counts).
    message = ready.json()["error"]["message"]
    assert "1 of 2" in message and "dead-model" not in message and "fake" not in message


def test_readiness_follows_engine_health(tmp_path: object, fake_engine: tuple[object, str]) -> None:
    from pathlib import Path

    from serve.config.gateway import GatewayFile, build_settings
    from serve.gateway.app import create_app
    from tests.integration.conftest import model_file
    from tests.servers import run_server

    engine, url = fake_engine
    assert isinstance(tmp_path, Path)
    file = GatewayFile(
        keys_file=tmp_path / "keys.yaml",
        models=[{"file": model_file(tmp_path, "m", url, [])}],  # type: ignore[list-item]
        health_interval=0.2,
    )
    with run_server(create_app(build_settings(file, base_dir=tmp_path))) as gw:
        assert httpx.get(f"{gw}/readyz").status_code == 200
        engine.healthy = False  # type: ignore[attr-defined]
        deadline = time.monotonic() + 5
        while httpx.get(f"{gw}/readyz").status_code == 200:
            assert time.monotonic() < deadline, "gateway still ready with its only engine down"
            time.sleep(0.1)
        engine.healthy = True  # type: ignore[attr-defined]
        while httpx.get(f"{gw}/readyz").status_code != 200:
            assert time.monotonic() < deadline + 5, "gateway did not become ready again"
            time.sleep(0.1)


def test_request_id_is_returned_but_the_engine_gets_the_gateways(gateway: Gateway) -> None:
    headers = {"authorization": f"Bearer {gateway.key}", "x-request-id": "abc-123"}
    body = {"model": "fake", "messages": [{"role": "user", "content": "x"}]}
    resp = httpx.post(f"{gateway.v1}/chat/completions", json=body, headers=headers)
    assert resp.headers["x-request-id"] == "abc-123"
    # Two tenants sending the same id must not collide in the engine: it sees the gateway's own id.
    httpx.post(f"{gateway.v1}/chat/completions", json=body, headers=headers)
    engine_ids = [h["x-request-id"] for h in gateway.engine.headers[-2:]]
    assert "abc-123" not in engine_ids and len(set(engine_ids)) == 2
    assert all(len(i) == 32 for i in engine_ids)
    bad = httpx.post(f"{gateway.v1}/chat/completions", json=body, headers={**headers, "x-request-id": "has space!"})
    assert bad.headers["x-request-id"] != "has space!" and len(bad.headers["x-request-id"]) == 32


def test_metrics_count_requests_and_tokens(gateway: Gateway) -> None:
    c = client(gateway)
    c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}])
    list(c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], stream=True))
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    text = httpx.get(f"{gateway.url}/metrics").text
    route = "/v1/chat/completions"
    assert metric_sum(text, "gateway_requests_total", model="fake-model", route=route, status_class="2xx") == 2
    assert metric_sum(text, "gateway_requests_total", model="none", route=route, status_class="4xx") == 1
    assert metric_sum(text, "gateway_prompt_tokens_total", model="fake-model") == 14
    assert metric_sum(text, "gateway_completion_tokens_total", model="fake-model") == 6
    # Time to first token is a streaming measure: the non-streamed answer does not count.
    assert metric_sum(text, "gateway_time_to_first_token_seconds_count", model="fake-model") == 1
    assert metric_sum(text, "gateway_inter_token_latency_seconds_count", model="fake-model") == 2
    assert metric_sum(text, "gateway_overhead_seconds_count", model="fake-model") == 2
    assert gateway.key not in text


def test_no_api_description_by_default(gateway: Gateway) -> None:
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert_envelope(httpx.get(f"{gateway.url}{path}"), 404)


def test_metrics_ask_for_the_metrics_key_when_one_is_set(
    tmp_path: Path, fake_engine: tuple[FakeEngine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMSERVE_METRICS_KEY", "metrics-secret")
    engine, url = fake_engine
    with gateway_for(tmp_path, [model_file(tmp_path, "m", url, [])], engine) as gw:
        assert_envelope(httpx.get(f"{gw.url}/metrics"), 401)
        assert_envelope(httpx.get(f"{gw.url}/metrics", headers={"authorization": f"Bearer {gw.key}"}), 401)
        ok = httpx.get(f"{gw.url}/metrics", headers={"authorization": "Bearer metrics-secret"})
        assert ok.status_code == 200 and "gateway_requests_total" in ok.text


def test_metrics_without_a_key_answer_loopback_only() -> None:
    """Without LLMSERVE_METRICS_KEY a client from the network is refused (driven here without a socket)."""
    from serve.gateway.context import RequestContext
    from serve.gateway.routes import metrics

    state = type("State", (), {"metrics_key": None})()
    ctx = RequestContext(id="r", start=0.0, route="/metrics", client="10.1.2.3")
    with pytest.raises(Forbidden):
        asyncio.run(metrics(state, ctx, {"headers": []}, _never, _never))  # type: ignore[arg-type]


async def _never(*_: object) -> object:
    raise AssertionError("not reached")


@pytest.mark.parametrize(
    "content",
    [
        # A lone UTF-16 surrogate: valid JSON syntax, but no text a tokenizer or an engine can take.
        b'{"model": "fake", "messages": [{"role": "user", "content": "\\ud800"}]}',
        # Prompt lists nested far deeper than any OpenAI prompt form.
        b'{"model": "fake", "prompt": ' + b"[" * 900 + b"1" + b"]" * 900 + b"}",
        # Valid, parsed, but deeper than the body can be written back.
        b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "response_format": '
        + b'{"a": ' * 300
        + b"1"
        + b"}" * 300
        + b"}",
    ],
    ids=["lone-surrogate", "nested-prompt", "nested-field"],
)
def test_odd_valid_json_is_a_4xx_and_keeps_the_connection(gateway: Gateway, content: bytes) -> None:
    path = "/v1/completions" if b'"prompt"' in content else "/v1/chat/completions"
    headers = {"authorization": f"Bearer {gateway.key}", "content-type": "application/json"}
    with httpx.Client(base_url=gateway.url, headers=headers) as http:
        resp = http.post(path, content=content)
        assert 400 <= resp.status_code < 500, resp.text
        assert_envelope(resp, resp.status_code)
        # The same keep-alive connection still serves the next request.
        assert (
            http.post(
                "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "x"}]}
            ).status_code
            == 200
        )
        assert resp.headers.get("connection") != "close"
