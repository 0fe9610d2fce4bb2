"""`llmserve gateway --workers 2`: both serve one port, one SIGTERM drains them all, a dead worker is replaced."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.fake_engine import FakeEngine
from tests.integration.gateway_process import GatewayProcess, gateway_process
from tests.servers import run_server

CHAT: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@pytest.fixture
def engine() -> Iterator[tuple[FakeEngine, str]]:
    fake = FakeEngine()
    with run_server(fake.app()) as url:
        yield fake, url


def post(gw: GatewayProcess, body: dict[str, object]) -> httpx.Response:
    # A new connection each time, so requests reach whichever worker accepts it.
    return httpx.post(
        f"{gw.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {gw.key}"}, timeout=30
    )


def is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


def assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while any(is_worker(pid) for pid in pids):
        assert time.monotonic() < deadline, f"a worker of {pids} outlived its supervisor"
        time.sleep(0.1)


def wait_for_workers(gw: GatewayProcess, count: int, other_than: frozenset[int] = frozenset()) -> list[int]:
    deadline = time.monotonic() + 30
    while True:
        workers = gw.workers()
        if len(workers) == count and not other_than & set(workers):
            return workers
        assert time.monotonic() < deadline, f"workers: {workers}\n{gw.log()}"
        time.sleep(0.1)


def test_one_sigterm_to_the_process_group_drains_every_worker(tmp_path: Path, engine: tuple[FakeEngine, str]) -> None:
    fake, url = engine
    with gateway_process(tmp_path, url, args=("--workers", "2"), drain_timeout=15) as gw:
        workers = wait_for_workers(gw, 2)
        assert all(post(gw, CHAT).status_code == 200 for _ in range(6))
        fake.chunks, fake.delay = 15, 0.2  # 3 s streams
        received: list[list[str]] = [[] for _ in range(4)]

        def stream(lines: list[str]) -> None:
            headers = {"authorization": f"Bearer {gw.key}"}
            body = {**CHAT, "stream": True}
            with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
                lines.extend(r.iter_lines())

        readers = [threading.Thread(target=stream, args=(lines,)) for lines in received]
        for reader in readers:
            reader.start()
        while len(fake.sent_at) < 4:
            time.sleep(0.02)
        # What `llmserve up` and Kubernetes do: every process of the group gets the signal at once.
        os.killpg(gw.proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        for _ in range(6):
            ready = httpx.get(f"{gw.url}/readyz", timeout=10)
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
            refused = post(gw, CHAT)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        for reader in readers:
            reader.join(timeout=20)
        assert all("data: [DONE]" in lines for lines in received), "a stream in flight was cut by the drain"
        assert gw.proc.wait(timeout=20) == 0, gw.log()
        assert gw.log().count("draining: ") == 2, "not every worker drained"
        assert_gone(workers)


def test_a_worker_that_dies_is_replaced_and_sigterm_to_the_supervisor_drains(
    tmp_path: Path, engine: tuple[FakeEngine, str]
) -> None:
    _, url = engine
    with gateway_process(tmp_path, url, args=("--workers", "2")) as gw:
        first = wait_for_workers(gw, 2)
        os.kill(first[0], signal.SIGKILL)
        second = wait_for_workers(gw, 2, other_than=frozenset({first[0]}))
        assert first[1] in second
        deadline = time.monotonic() + 30
        while httpx.get(f"{gw.url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert all(post(gw, CHAT).status_code == 200 for _ in range(6))
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=30) == 0, gw.log()
        assert_gone(second)
