"""Streaming through the gateway: pass-through without buffering, usage handling, disconnects, broken engines."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import pytest
from openai import OpenAI

from tests.integration.conftest import Gateway
from tests.metrics_text import metric_sum

BODY = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": True}


def auth(gw: Gateway) -> dict[str, str]:
    return {"authorization": f"Bearer {gw.key}"}


def events(resp: httpx.Response) -> list[str]:
    return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def test_chunks_arrive_as_the_engine_sends_them(gateway: Gateway) -> None:
    gateway.engine.chunks, gateway.engine.delay = 4, 0.3
    arrivals: list[float] = []
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=BODY, headers=auth(gateway)) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if '"tok' in line:
                arrivals.append(time.monotonic())
    sent = gateway.engine.sent_at
    assert len(arrivals) == len(sent) == 4
    # Each token reaches the client well before the engine sends the next one (0.3 s later): no buffering.
    for got, emitted in zip(arrivals, sent, strict=True):
        assert got - emitted < 0.2


def test_usage_chunk_is_removed_when_not_asked_but_counted(gateway: Gateway) -> None:
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=BODY, headers=auth(gateway)) as resp:
        data = events(resp)
    assert data[-1] == "[DONE]"
    assert all('"usage"' not in d for d in data)
    assert gateway.engine.requests[-1]["stream_options"] == {"include_usage": True}
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert metric_sum(metrics, "gateway_completion_tokens_total", model="fake-model") == 3


def test_usage_chunk_is_kept_when_asked(gateway: Gateway) -> None:
    client = OpenAI(base_url=gateway.v1, api_key=gateway.key, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 "


def test_client_disconnect_closes_the_engine_request(gateway: Gateway) -> None:
    gateway.engine.chunks, gateway.engine.delay = 200, 0.05
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=BODY, headers=auth(gateway)) as resp:
        lines = resp.iter_lines()
        for _ in range(4):
            next(lines)
    assert gateway.engine.aborted.wait(5), "the engine kept generating for a client that left"
    assert not gateway.engine.finished.is_set()
    deadline = time.monotonic() + 5
    while metric_sum(httpx.get(f"{gateway.url}/metrics").text, "gateway_inflight_requests", model="fake-model"):
        assert time.monotonic() < deadline, "in-flight gauge did not return to 0"
        time.sleep(0.05)


def test_non_streamed_disconnect_closes_the_engine_request(gateway: Gateway) -> None:
    gateway.engine.delay = 8.0
    body = {**BODY, "stream": False}
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(f"{gateway.v1}/chat/completions", json=body, headers=auth(gateway), timeout=0.5)
    # Well before the engine would answer (8 s), the gateway has let go of the request.
    deadline = time.monotonic() + 3
    while metric_sum(httpx.get(f"{gateway.url}/metrics").text, "gateway_inflight_requests", model="fake-model"):
        assert time.monotonic() < deadline, "the gateway kept waiting for a client that left"
        time.sleep(0.05)


def test_engine_dying_mid_stream_becomes_an_sse_error_event(gateway: Gateway) -> None:
    gateway.engine.mode = "die"
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=BODY, headers=auth(gateway)) as resp:
        assert resp.status_code == 200
        data = events(resp)
    last = json.loads(data[-1])
    assert last["error"]["code"] == "upstream_broken"
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert any("tok0" in d for d in data)


@pytest.mark.parametrize("crlf, end_blank_line", [(True, True), (False, False)], ids=["crlf", "unterminated-last"])
def test_sse_framing_variants(gateway: Gateway, crlf: bool, end_blank_line: bool) -> None:
    gateway.engine.chunks, gateway.engine.delay = 4, 0.3
    gateway.engine.crlf, gateway.engine.end_blank_line = crlf, end_blank_line
    arrivals: list[float] = []
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=BODY, headers=auth(gateway)) as resp:
        data = []
        for line in resp.iter_lines():
            if '"tok' in line:
                arrivals.append(time.monotonic())
            if line.startswith("data: "):
                data.append(line[6:])
    assert len(arrivals) == 4
    for got, emitted in zip(arrivals, gateway.engine.sent_at, strict=True):
        assert got - emitted < 0.2, "events were held back"
    assert all('"usage"' not in d for d in data), "the usage event the client did not ask for reached it"
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert metric_sum(metrics, "gateway_completion_tokens_total", model="fake-model") == 4
    assert metric_sum(metrics, "gateway_time_to_first_token_seconds_count", model="fake-model") == 1
    assert metric_sum(metrics, "gateway_inter_token_latency_seconds_count", model="fake-model") == 3


def test_an_event_that_never_ends_is_cut_at_the_bound(gateway: Gateway) -> None:
    """16 MiB without the blank line that ends an event: an error event at the bound, not 16 MiB buffered."""
    gateway.engine.endless_event = 16 * 1024 * 1024
    started = time.monotonic()
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=BODY, headers=auth(gateway), timeout=60) as resp:
        assert resp.status_code == 200
        data = events(resp)
    assert json.loads(data[-1])["error"]["code"] == "event_too_large"
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while metric_sum(httpx.get(f"{gateway.url}/metrics").text, "gateway_inflight_requests", model="fake-model"):
        assert time.monotonic() < deadline, "the request was not released"
        time.sleep(0.05)
