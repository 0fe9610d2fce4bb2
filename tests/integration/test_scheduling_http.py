"""The gateway's queue over real HTTP: waiting, leaving, bounds, classes, the engine's priority, drain."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
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


@dataclass
class Stack:
    app: Gateway
    url: str
    engine: FakeEngine
    keys: dict[str, str]

    def post(self, key: str, body: dict[str, object] | None = None, timeout: float = 30) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.keys[key]}"}
        return httpx.post(f"{self.url}/v1/chat/completions", json=body or CHAT, headers=headers, timeout=timeout)

    def queued(self) -> float:
        return metric_sum(httpx.get(f"{self.url}/metrics").text, "gateway_queue_depth")

    def wait_queued(self, n: int) -> None:
        deadline = time.monotonic() + 10
        while self.queued() != n:
            assert time.monotonic() < deadline, f"queue depth never reached {n}"
            time.sleep(0.02)


def stack_for(tmp_path: Path, scheduling: dict[str, object], **engine: object) -> Iterator[Stack]:
    fake = FakeEngine()
    with run_server(fake.app()) as engine_url:
        keys_path = tmp_path / "keys.yaml"
        keys = {
            "standard": create_key(keys_path, "standard", tpm=10_000)[0],
            "interactive": create_key(keys_path, "interactive", priority="interactive")[0],
            "batch": create_key(keys_path, "batch", priority="batch")[0],
        }
        extra = {"engine": {"device": "cpu", "max_model_len": 2048, **engine}} if engine else {}
        path = model_file(tmp_path, "m", engine_url, [], {"scheduling": scheduling}, **extra)
        file = GatewayFile.model_validate({"keys_file": keys_path, "models": [{"file": path}], "health_interval": 0.5})
        app = create_app(build_settings(file, base_dir=tmp_path, engine_key=ENGINE_KEY))
        with run_server(app) as url:
            yield Stack(app=app, url=url, engine=fake, keys=keys)


@pytest.fixture
def one_slot(tmp_path: Path) -> Iterator[Stack]:
    yield from stack_for(tmp_path, {"max_running_per_engine": 1, "max_queue": 2, "max_queue_wait": 1.5})


def hold_the_engine(s: Stack, seconds: float = 2.0) -> threading.Thread:
    """One slow answer that keeps the only slot busy."""
    s.engine.delay = seconds
    thread = threading.Thread(target=s.post, args=("batch",), daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not s.engine.requests:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return thread


def test_over_the_target_requests_wait_instead_of_reaching_the_engine(one_slot: Stack) -> None:
    s = one_slot
    holder = hold_the_engine(s, 1.0)
    started = time.monotonic()
    resp = s.post("interactive")
    assert resp.status_code == 200
    # It waited for the slot (about the holder's second), and the engine never had two at once.
    assert time.monotonic() - started > 0.5
    holder.join()
    assert len(s.engine.requests) == 2


def test_a_queued_client_that_leaves_frees_its_place_and_reservation(one_slot: Stack) -> None:
    s = one_slot
    holder = hold_the_engine(s, 2.0)
    with pytest.raises(httpx.ReadTimeout):
        s.post("standard", {**CHAT, "max_tokens": 90}, timeout=0.5)
    s.wait_queued(0)
    holder.join()
    assert len(s.engine.requests) == 1, "the request of a client that left reached the engine"
    s.engine.delay = 0.0
    resp = s.post("standard", {**CHAT, "max_tokens": 1})
    # Nothing of the left request's reservation (90 tokens and its prompt) is missing from the 10,000.
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) > 10_000 - 20, resp.headers


def test_queue_overflow_and_timeout_are_429_envelopes_with_retry_after(one_slot: Stack) -> None:
    s = one_slot
    holder = hold_the_engine(s, 3.0)
    answers: list[httpx.Response] = []
    waiting = [threading.Thread(target=lambda: answers.append(s.post("standard"))) for _ in range(2)]
    for t in waiting:
        t.start()
    s.wait_queued(2)
    full = s.post("interactive")
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["code"] == "queue_full"
    for t in waiting:
        t.join()
    # The slot stayed busy (3 s) past the queue's wait (1.5 s): both waiting requests timed out, spending nothing.
    assert [(a.status_code, a.json()["error"]["code"], a.headers["retry-after"]) for a in answers] == [
        (429, "queue_timeout", "1")
    ] * 2
    holder.join()
    assert len(s.engine.requests) == 1
    text = httpx.get(f"{s.url}/metrics").text
    assert metric_sum(text, "gateway_errors_total", reason="queue_full") == 1
    assert metric_sum(text, "gateway_errors_total", reason="queue_timeout") == 2


def test_interactive_goes_before_batch_that_came_first(one_slot: Stack) -> None:
    s = one_slot
    holder = hold_the_engine(s, 1.0)
    done: list[str] = []

    def send(key: str) -> None:
        s.post(key)
        done.append(key)

    first = threading.Thread(target=send, args=("batch",))
    first.start()
    s.wait_queued(1)
    second = threading.Thread(target=send, args=("interactive",))
    second.start()
    s.wait_queued(2)
    s.engine.delay = 0.2
    holder.join()
    first.join()
    second.join()
    assert done == ["interactive", "batch"]


def test_drain_answers_queued_requests_at_once(one_slot: Stack) -> None:
    s = one_slot
    holder = hold_the_engine(s, 2.0)
    answers: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: answers.append(s.post("standard")))
    waiter.start()
    s.wait_queued(1)
    s.app.drain.begin()
    started = time.monotonic()
    waiter.join()
    assert answers[0].status_code == 503 and answers[0].json()["error"]["code"] == "draining"
    assert time.monotonic() - started < 1.0
    holder.join()


def test_the_engine_gets_the_class_as_its_priority(tmp_path: Path) -> None:
    for s in stack_for(tmp_path, {}, scheduling_policy="priority"):
        for key in ("interactive", "standard", "batch"):
            assert s.post(key).status_code == 200
        assert [r["priority"] for r in s.engine.requests] == [-10, 0, 10]
        # A client cannot set it itself.
        assert s.post("batch", {**CHAT, "priority": -100}).status_code == 400
