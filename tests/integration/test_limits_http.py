"""Per-key limits through real HTTP: 429 envelopes with headers, slots released on every path, Redis shared."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from serve.config.keys import create_key
from tests.integration.conftest import Gateway, gateway_for, model_file
from tests.integration.fake_engine import FakeEngine
from tests.integration.test_limits_redis import redis_server
from tests.metrics_text import metric_sum

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10}


def post(gw: Gateway, key: str, body: dict[str, object] = CHAT) -> httpx.Response:
    return httpx.post(f"{gw.v1}/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)


def limited_key(gw: Gateway, **limits: int) -> str:
    key, _ = create_key(gw.keys_path, "limited", **limits)  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while httpx.get(f"{gw.v1}/models", headers={"authorization": f"Bearer {key}"}).status_code == 401:
        assert time.monotonic() < deadline, "the gateway did not pick up the new key"
        time.sleep(0.2)
    return key


@pytest.fixture
def gw(tmp_path: Path, fake_engine: tuple[FakeEngine, str]) -> Gateway:
    engine, url = fake_engine
    with gateway_for(tmp_path, [model_file(tmp_path, "m", url, [])], engine) as gateway:
        yield gateway  # type: ignore[misc]


def test_requests_per_minute(gw: Gateway) -> None:
    key = limited_key(gw, rpm=2)
    first = post(gw, key)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert post(gw, key).status_code == 200
    refused = post(gw, key)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_requests")
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(gw.engine.requests) == 2
    text = httpx.get(f"{gw.url}/metrics").text
    assert metric_sum(text, "gateway_rate_limited_total", limit="rate_limit_requests") == 1
    assert post(gw, gw.key).status_code == 200, "another key's budget is its own"


def test_tokens_per_minute_reserve_and_settle(gw: Gateway) -> None:
    key = limited_key(gw, tpm=100)
    too_big = post(gw, key, {**CHAT, "max_tokens": 99})
    assert too_big.status_code == 429 and too_big.json()["error"]["code"] == "request_too_large_for_tpm"
    assert gw.engine.requests == []
    first = post(gw, key, {**CHAT, "max_tokens": 50})
    assert first.status_code == 200
    # Reserved: the prompt estimate plus 50; settled afterwards with the engine's usage (7 + 3 = 10 tokens).
    reserved_left = int(first.headers["x-ratelimit-remaining-tokens"])
    assert reserved_left < 50
    second = post(gw, key, {**CHAT, "max_tokens": 50})
    assert second.status_code == 200, "the unused part of the first reservation was not given back"
    assert int(second.headers["x-ratelimit-remaining-tokens"]) < reserved_left


def test_concurrency_slot_is_released_when_a_stream_is_abandoned(gw: Gateway) -> None:
    key = limited_key(gw, max_concurrency=1)
    gw.engine.chunks, gw.engine.delay = 200, 0.05
    headers = {"authorization": f"Bearer {key}"}
    with httpx.stream("POST", f"{gw.v1}/chat/completions", json={**CHAT, "stream": True}, headers=headers) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        next(lines)
        busy = post(gw, key)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "concurrency_limit"
    assert gw.engine.aborted.wait(5)
    gw.engine.chunks, gw.engine.delay = 3, 0.0
    deadline = time.monotonic() + 5
    while (again := post(gw, key)).status_code == 429:
        assert time.monotonic() < deadline, "the abandoned stream kept its concurrency slot"
        time.sleep(0.05)
    assert again.status_code == 200


def test_slot_is_released_after_an_engine_error(gw: Gateway) -> None:
    key = limited_key(gw, max_concurrency=1)
    gw.engine.mode, gw.engine.status = "status", 500
    assert post(gw, key).status_code == 502
    gw.engine.mode = "ok"
    assert post(gw, key).status_code == 200


def test_two_gateway_replicas_share_one_budget_in_redis(tmp_path: Path, fake_engine: tuple[FakeEngine, str]) -> None:
    engine, url = fake_engine
    path = model_file(tmp_path, "m", url, [])
    with redis_server() as redis_url:
        limits = {"backend": "redis", "redis_url": redis_url, "key_prefix": "http-test:"}
        with gateway_for(tmp_path / "a", [path], engine, limits=limits) as a:
            key, _ = create_key(a.keys_path, "shared", rpm=3)
            with gateway_for(tmp_path / "b", [path], engine, limits=limits) as b:
                # Both replicas read the same keys file in production; here each has its own, with the same key.
                b.keys_path.write_text(a.keys_path.read_text())
                for gw in (a, b):
                    deadline = time.monotonic() + 10
                    while httpx.get(f"{gw.v1}/models", headers={"authorization": f"Bearer {key}"}).status_code != 200:
                        assert time.monotonic() < deadline
                        time.sleep(0.2)
                # /v1/models is not metered; three chat requests across two replicas use the one budget.
                codes = [post(gw, key).status_code for gw in (a, b, a, b)]
    assert codes == [200, 200, 200, 429]
