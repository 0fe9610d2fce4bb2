"""Faults between gateway and engines: timeouts, retries, ejection, overload, affinity, discovery."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from serve.config.keys import create_key
from tests.integration.conftest import Gateway, gateway_for, model_file
from tests.integration.fake_engine import FakeEngine
from tests.metrics_text import metric_sum
from tests.servers import free_port, run_server

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
FAST_TIMEOUTS = {"timeouts": {"connect": 1, "first_byte": 1, "idle": 1, "total": 3}}


def post(gw: Gateway, body: dict[str, object], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{gw.v1}/chat/completions", json=body, headers={"authorization": f"Bearer {gw.key}", **headers}, timeout=30
    )


def stream_events(gw: Gateway) -> list[str]:
    """A streamed chat through the gateway: its status must be 200; returns the data of every SSE event."""
    headers = {"authorization": f"Bearer {gw.key}"}
    body = {**CHAT, "stream": True}
    with httpx.stream("POST", f"{gw.v1}/chat/completions", json=body, headers=headers, timeout=30) as resp:
        assert resp.status_code == 200
        return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def inflight(gw: Gateway) -> float:
    return metric_sum(httpx.get(f"{gw.url}/metrics").text, "gateway_inflight_requests")


@pytest.fixture
def engines() -> Iterator[list[tuple[FakeEngine, str]]]:
    with ExitStack() as stack:
        fakes = [FakeEngine() for _ in range(2)]
        yield [(fake, stack.enter_context(run_server(fake.app()))) for fake in fakes]


def one_model(tmp_path: Path, engines: list[tuple[FakeEngine, str]], policy: dict[str, object], **settings: object):  # type: ignore[no-untyped-def]
    path = model_file(tmp_path, "m", [url for _, url in engines], [], policy)
    return gateway_for(tmp_path, [path], engines[0][0], **settings)


def test_engine_that_never_answers_is_504_and_released(tmp_path: Path, engines: list[tuple[FakeEngine, str]]) -> None:
    engines[0][0].mode = "hang"
    with one_model(tmp_path, engines[:1], FAST_TIMEOUTS) as gw:
        started = time.monotonic()
        resp = post(gw, {**CHAT, "stream": True})
        assert resp.status_code == 504, resp.text
        assert resp.json()["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - started < 5
        assert inflight(gw) == 0
        assert engines[0][0].aborted.wait(5), "the engine request was not closed"


def test_stall_mid_stream_becomes_an_error_event_and_closes_the_engine(
    tmp_path: Path, engines: list[tuple[FakeEngine, str]]
) -> None:
    engines[0][0].mode = "stall"
    with one_model(tmp_path, engines[:1], FAST_TIMEOUTS) as gw:
        data = stream_events(gw)
        assert "tok0" in "".join(data)
        assert json.loads(data[-1])["error"]["code"] == "idle_timeout"
        assert engines[0][0].aborted.wait(5)
        assert inflight(gw) == 0


def test_total_timeout_ends_a_slow_stream(tmp_path: Path, engines: list[tuple[FakeEngine, str]]) -> None:
    fake = engines[0][0]
    fake.chunks, fake.delay = 100, 0.2  # never idle for 1 s, but 20 s in all: beyond the 3 s total
    with one_model(tmp_path, engines[:1], FAST_TIMEOUTS) as gw:
        data = stream_events(gw)
        assert json.loads(data[-1])["error"]["code"] == "total_timeout"
        assert fake.aborted.wait(5)


def test_503_is_retried_once_on_another_endpoint(tmp_path: Path, engines: list[tuple[FakeEngine, str]]) -> None:
    (first, _), (second, _) = engines
    first.mode, first.status = "status", 503
    with one_model(tmp_path, engines, {}) as gw:
        resp = post(gw, CHAT)
        assert resp.status_code == 200, resp.text
        assert len(first.requests) == 1 and len(second.requests) == 1
        assert metric_sum(httpx.get(f"{gw.url}/metrics").text, "gateway_retries_total", model="m") == 1


def test_failing_endpoint_is_ejected_and_comes_back_when_healthy(
    tmp_path: Path, engines: list[tuple[FakeEngine, str]]
) -> None:
    (bad, bad_url), (good, _) = engines
    # Its health check fails from its second failed request on, so the checks (every 0.3 s) can neither eject it
    # before the requests do nor bring it back before it is well.
    bad.mode, bad.status, bad.sick_after = "status", 500, 2
    routing = {"routing": {"eject_after": 2, "eject_min_keys": 1}}
    with one_model(tmp_path, engines, routing, health_interval=0.3) as gw:
        codes = [post(gw, CHAT).status_code for _ in range(6)]
        assert codes.count(502) == 2, codes  # two failures, then ejected: the rest go to the good endpoint
        assert len(bad.requests) == 2 and len(good.requests) == 4
        text = httpx.get(f"{gw.url}/metrics").text
        assert metric_sum(text, "gateway_endpoint_up", endpoint=bad_url) == 0
        assert metric_sum(text, "gateway_endpoint_ejections_total", model="m") == 1
        bad.mode, bad.sick_after = "ok", None
        deadline = time.monotonic() + 5
        while metric_sum(httpx.get(f"{gw.url}/metrics").text, "gateway_endpoint_up", endpoint=bad_url) != 1:
            assert time.monotonic() < deadline, "endpoint did not come back after passing its health check"
            time.sleep(0.1)


def test_one_keys_failures_do_not_eject_a_healthy_engine(tmp_path: Path, engines: list[tuple[FakeEngine, str]]) -> None:
    """A tenant whose requests make the engine fail must not get it ejected for everyone (the default policy)."""
    fake = engines[0][0]
    with one_model(tmp_path, engines[:1], {}) as gw:
        other, _ = create_key(gw.keys_path, "other")
        wait_for_key(gw, other)
        fake.mode, fake.status = "status", 500
        assert [post(gw, CHAT).status_code for _ in range(6)] == [502] * 6
        fake.mode = "ok"
        assert post(gw, CHAT, authorization=f"Bearer {other}").status_code == 200
        assert metric_sum(httpx.get(f"{gw.url}/metrics").text, "gateway_endpoint_ejections_total") == 0
        # Failures seen by two keys are the engine's: it is ejected.
        fake.mode = "status"
        codes = [post(gw, CHAT, authorization=f"Bearer {k}").status_code for k in (gw.key, other, gw.key)]
        assert codes == [502] * 3, codes
        assert metric_sum(httpx.get(f"{gw.url}/metrics").text, "gateway_endpoint_ejections_total") == 1


def wait_for_key(gw: Gateway, key: str) -> None:
    """The gateway picks up a changed keys file on its own, within seconds."""
    deadline = time.monotonic() + 10
    while httpx.get(f"{gw.v1}/models", headers={"authorization": f"Bearer {key}"}).status_code == 401:
        assert time.monotonic() < deadline, "the new key was not picked up"
        time.sleep(0.2)


def test_overloaded_model_is_503_with_retry_after(tmp_path: Path, engines: list[tuple[FakeEngine, str]]) -> None:
    fake = engines[0][0]
    fake.chunks, fake.delay = 20, 0.1
    with one_model(tmp_path, engines[:1], {"routing": {"max_inflight": 1}}) as gw:
        headers = {"authorization": f"Bearer {gw.key}"}
        with httpx.stream("POST", f"{gw.v1}/chat/completions", json={**CHAT, "stream": True}, headers=headers) as s:
            assert s.status_code == 200
            refused = post(gw, CHAT)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "overloaded"
            assert refused.headers["retry-after"] == "1"
            s.read()
        assert post(gw, CHAT).status_code == 200


def test_session_affinity_keeps_a_session_on_one_engine(tmp_path: Path, engines: list[tuple[FakeEngine, str]]) -> None:
    with one_model(tmp_path, engines, {"routing": {"policy": "session_affinity"}}) as gw:
        for session in range(12):
            for _ in range(3):
                assert post(gw, CHAT, **{"x-session-id": f"s{session}"}).status_code == 200
    per_engine = [[h["x-request-id"] for h in fake.headers] for fake, _ in engines]
    assert all(per_engine), "12 sessions all landed on one engine"
    assert sum(map(len, per_engine)) == 36
    # Each session's three requests went to the same engine: counts per engine are multiples of 3.
    assert all(len(reqs) % 3 == 0 for reqs in per_engine)


def test_prefix_affinity_routes_equal_prefixes_together(tmp_path: Path, engines: list[tuple[FakeEngine, str]]) -> None:
    with one_model(tmp_path, engines, {"routing": {"policy": "prefix_affinity", "prefix_tokens": 8}}) as gw:
        for doc in range(10):
            for question in range(2):
                body = {
                    "model": "m",
                    "messages": [{"role": "user", "content": f"document {doc} " * 20 + f"q{question}"}],
                }
                assert post(gw, body).status_code == 200
    for fake, _ in engines:
        docs = [r["messages"][0]["content"].split()[1] for r in fake.requests]
        assert all(docs.count(d) == 2 for d in docs), "requests sharing a prefix were split across engines"
    assert all(fake.requests for fake, _ in engines)


def test_dns_discovery_finds_engines(tmp_path: Path, engines: list[tuple[FakeEngine, str]]) -> None:
    fake, url = engines[0]
    port = int(url.rsplit(":", 1)[1])
    path = model_file(tmp_path, "m", [], [], discovery={"name": "localhost", "port": port})
    with gateway_for(tmp_path, [path], fake) as gw:
        assert post(gw, CHAT).status_code == 200
        assert fake.requests


@pytest.mark.parametrize(
    "body, code",
    [
        ({**CHAT, "messages": [{"role": "user", "content": "x"}] * 9}, "too_many_messages"),
        ({**CHAT, "n": 5}, "n_too_large"),
    ],
)
def test_input_limits(
    tmp_path: Path, engines: list[tuple[FakeEngine, str]], body: dict[str, object], code: str
) -> None:
    with one_model(tmp_path, engines[:1], {"max_messages": 8, "max_n": 4}) as gw:
        resp = post(gw, body)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == code
    assert engines[0][0].requests == []


def test_oversized_headers_are_refused(tmp_path: Path, engines: list[tuple[FakeEngine, str]]) -> None:
    with one_model(tmp_path, engines[:1], {}, max_header_bytes=8192) as gw:
        resp = post(gw, CHAT, **{"x-padding": "a" * 10000})
        assert resp.status_code == 431 and resp.json()["error"]["code"] == "headers_too_large"
    assert engines[0][0].requests == []


def test_a_burst_cannot_overshoot_max_inflight(tmp_path: Path, engines: list[tuple[FakeEngine, str]]) -> None:
    engines[0][0].delay = 3.0
    with one_model(tmp_path, engines[:1], {"routing": {"max_inflight": 2}}) as gw, ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda _: post(gw, CHAT).status_code, range(8)))
    assert codes == [200, 200] + [503] * 6
    assert len(engines[0][0].requests) == 2


def test_a_503_with_a_broken_body_is_an_envelope_and_leaks_nothing(tmp_path: Path) -> None:
    """An engine that answers 503 and drops the connection mid-body."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                request = conn.recv(65536)
                if request.startswith(b"GET /health"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                else:
                    conn.sendall(b'HTTP/1.1 503 Service Unavailable\r\ncontent-length: 100\r\n\r\n{"err')

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        path = model_file(tmp_path, "m", f"http://127.0.0.1:{port}", [])
        with gateway_for(tmp_path, [path], FakeEngine()) as gw:
            resp = post(gw, CHAT)
            assert resp.status_code == 503 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
            assert inflight(gw) == 0
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
