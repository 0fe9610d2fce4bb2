"""Every way a request can end leaves nothing behind: in-flight counts, endpoint leases and limiter slots are zero."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serve.config.gateway import GatewayFile, build_settings
from serve.config.keys import create_key
from serve.gateway.app import Gateway, create_app
from tests.integration.conftest import ENGINE_KEY, model_file
from tests.integration.fake_engine import FakeEngine
from tests.metrics_text import metric_sum
from tests.servers import run_server

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
TIMEOUTS = {"timeouts": {"connect": 1, "first_byte": 1.5, "idle": 1, "total": 20}}


@dataclass
class Stack:
    app: Gateway
    url: str
    key: str
    key_id: str
    engine: FakeEngine
    # A key with a small tokens-per-minute budget, where a wrong charge shows.
    small_key: str

    def post(self, body: dict[str, object], timeout: float = 30) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.key}"}
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=timeout)

    def figures(self) -> dict[str, float]:
        """Every count of what requests hold, from each place that could keep one."""
        state = self.app.state
        assert state is not None
        return {
            "pool_inflight": sum(pool.inflight for pool in state.pools),
            "endpoint_outstanding": sum(ep.outstanding for pool in state.pools for ep in pool.endpoints),
            "drain_inflight": self.app.drain.inflight(),
            "limiter_slots": asyncio.run(state.limiter.outstanding(self.key_id)),
            "inflight_gauge": metric_sum(httpx.get(f"{self.url}/metrics").text, "gateway_inflight_requests"),
        }

    def assert_settled(self, within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while any(self.figures().values()):
            assert time.monotonic() < deadline, f"still held after the request ended: {self.figures()}"
            time.sleep(0.05)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    engine = FakeEngine()
    with run_server(engine.app()) as engine_url:
        keys = tmp_path / "keys.yaml"
        # Limits make the limiter keep a slot per request, so a leaked ticket shows.
        key, record = create_key(keys, "t", rpm=10_000, tpm=10_000_000, max_concurrency=50)
        small, _ = create_key(keys, "small", tpm=2000)
        file = GatewayFile.model_validate(
            {"keys_file": keys, "models": [{"file": model_file(tmp_path, "m", engine_url, [], TIMEOUTS)}]}
        )
        app = create_app(build_settings(file, base_dir=tmp_path, engine_key=ENGINE_KEY))
        with run_server(app) as url:
            yield Stack(app=app, url=url, key=key, key_id=record.id, engine=engine, small_key=small)


def stream_lines(s: Stack, lines: int | None = None) -> list[str]:
    """A streamed chat; with `lines`, the client leaves after reading that many lines."""
    got: list[str] = []
    headers = {"authorization": f"Bearer {s.key}"}
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers) as r:
        for line in r.iter_lines():
            if line:
                got.append(line)
            if lines is not None and len(got) >= lines:
                break
    return got


def success_plain(s: Stack) -> None:
    assert s.post(CHAT).status_code == 200


def success_stream(s: Stack) -> None:
    assert stream_lines(s)[-1] == "data: [DONE]"


def engine_error(s: Stack) -> None:
    s.engine.mode, s.engine.status = "status", 500
    assert s.post(CHAT).status_code == 502


def first_byte_timeout(s: Stack) -> None:
    s.engine.mode = "hang"
    assert s.post({**CHAT, "stream": True}).status_code == 504
    assert s.engine.aborted.wait(5)


def idle_timeout(s: Stack) -> None:
    s.engine.mode = "stall"
    data = [line for line in stream_lines(s) if line.startswith("data: ")]
    assert json.loads(data[-1][6:])["error"]["code"] == "idle_timeout"
    assert s.engine.aborted.wait(5)


def client_gone_before_first_byte(s: Stack) -> None:
    s.engine.mode = "hang"
    with pytest.raises(httpx.ReadTimeout):
        s.post(CHAT, timeout=0.5)
    assert s.engine.aborted.wait(5), "the engine request outlived the client"


def client_gone_mid_stream(s: Stack) -> None:
    s.engine.chunks, s.engine.delay = 200, 0.05
    stream_lines(s, lines=4)
    assert s.engine.aborted.wait(5), "the engine kept generating for a client that left"


def client_stops_reading(s: Stack) -> None:
    # The engine floods; the client never reads, so the gateway's writes block once the socket buffers are full.
    s.engine.chunks, s.engine.deltas = 0, [{"content": "x" * 4000}] * 5000
    host, port = s.url.removeprefix("http://").split(":")
    body = json.dumps({**CHAT, "stream": True}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {s.key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(head + body)
        # Idle timeout 1 s: the gateway gives up on the stalled client and closes the engine request.
        # Generous: the engine, the gateway and this client share one process (and a busy machine).
        assert s.engine.aborted.wait(30), "a client that stopped reading held its stream"


def drain(s: Stack) -> None:
    s.engine.chunks, s.engine.delay = 10, 0.1
    headers = {"authorization": f"Bearer {s.key}"}
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers) as r:
        lines = r.iter_lines()
        next(lines)
        s.app.drain.begin()
        refused = s.post(CHAT)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        rest = list(lines)
    assert "data: [DONE]" in rest, "a stream in flight was cut by the drain"


def engine_refuses(s: Stack) -> None:
    s.engine.mode, s.engine.status = "status", 400
    assert s.post(CHAT).status_code == 400


def rate_limited(s: Stack) -> None:
    # More than the small key's tokens per minute can ever hold: refused after the endpoint lease was taken.
    body = {**CHAT, "max_tokens": 100, "messages": [{"role": "user", "content": "x" * 9000}]}
    resp = httpx.post(f"{s.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {s.small_key}"})
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "request_too_large_for_tpm", resp.text


ENDINGS: dict[str, Callable[[Stack], None]] = {
    "success": success_plain,
    "success-stream": success_stream,
    "engine-error": engine_error,
    "engine-refuses": engine_refuses,
    "rate-limited": rate_limited,
    "first-byte-timeout": first_byte_timeout,
    "idle-timeout": idle_timeout,
    "client-gone-before-first-byte": client_gone_before_first_byte,
    "client-gone-mid-stream": client_gone_mid_stream,
    "client-stops-reading": client_stops_reading,
    "drain": drain,
}


@pytest.mark.parametrize("ending", list(ENDINGS), ids=list(ENDINGS))
def test_every_ending_releases_everything(stack: Stack, ending: str) -> None:
    ENDINGS[ending](stack)
    stack.assert_settled()
    # And the gateway still answers afterwards (unless it is draining).
    if ending != "drain":
        stack.engine.mode, stack.engine.chunks, stack.engine.delay, stack.engine.deltas = "ok", 3, 0.0, None
        assert stack.post(CHAT).status_code == 200
        stack.assert_settled()


@pytest.mark.parametrize(
    "first",
    [
        {"reasoning_content": "Let me think."},
        {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]},
    ],
    ids=["reasoning", "tool-call"],
)
def test_ttft_is_the_first_output_of_any_kind(stack: Stack, first: dict[str, object]) -> None:
    # The first output comes 0.5 s in, the first plain content 1 s in: TTFT must be the former.
    stack.engine.delay, stack.engine.deltas = 0.5, [first, {"content": "Paris"}]
    stream_lines(stack)
    text = httpx.get(f"{stack.url}/metrics").text
    assert metric_sum(text, "gateway_time_to_first_token_seconds_count", model="m") == 1
    assert 0.4 < metric_sum(text, "gateway_time_to_first_token_seconds_sum", model="m") < 0.9


def test_an_engine_refusal_charges_no_tokens(stack: Stack) -> None:
    """A request the engine refuses (4xx, nothing generated) gives its whole reservation back."""
    stack.engine.mode, stack.engine.status = "status", 400
    headers = {"authorization": f"Bearer {stack.small_key}"}
    url = f"{stack.url}/v1/chat/completions"
    for _ in range(5):
        assert httpx.post(url, json={**CHAT, "max_tokens": 90}, headers=headers).status_code == 400
    stack.engine.mode = "ok"
    resp = httpx.post(url, json={**CHAT, "max_tokens": 1}, headers=headers)
    assert resp.status_code == 200
    # Only this last request's reservation (a few prompt tokens plus one) is missing from the 2,000-token bucket.
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) > 1900, resp.headers
