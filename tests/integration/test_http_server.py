"""The gateway's HTTP server against hostile clients: heads bounded as they arrive, slow heads and bodies, the cap."""

from __future__ import annotations

import json
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve.gateway.http_protocol import ConnectionStats, HttpLimits, bounded_protocol
from tests.integration.fake_engine import FakeEngine
from tests.integration.gateway_process import GatewayProcess, gateway_process
from tests.metrics_text import metric_sum
from tests.servers import run_server

MIB = 1024 * 1024
LIMIT = 32 * 1024
HEADER_TIMEOUT, BODY_TIMEOUT, BODY_MIN_RATE = 1.5, 1.0, 1000
# Growth of the gateway's peak memory that a refused head may cause: its bounded part and one read.
MEMORY_ALLOWANCE_KIB = 4 * 1024


@pytest.fixture(scope="module")
def engine_url() -> Iterator[str]:
    with run_server(FakeEngine().app()) as url:
        yield url


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> Iterator[GatewayProcess]:
    with gateway_process(
        tmp_path_factory.mktemp("gateway"),
        engine_url,
        max_header_bytes=LIMIT,
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        body_min_rate=BODY_MIN_RATE,
    ) as gw:
        yield gw


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (or resets it, or the timeout passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def send_until_answered(sock: socket.socket, data: bytes, piece: int = 64 * 1024) -> tuple[int, bytes]:
    """Sends `data` while the server says nothing; returns how much went out before its answer, and the answer."""
    # A small send buffer, so that what counts as sent is close to what the server could have read.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock.setblocking(False)
    sent = 0
    while sent < len(data):
        readable, writable, _ = select.select([sock], [sock], [], 10)
        if readable:
            break
        if writable:
            try:
                sent += sock.send(data[sent : sent + piece])
            except (BrokenPipeError, ConnectionResetError):
                break
    sock.setblocking(True)
    return sent, read_all(sock)


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def assert_envelope(response: bytes, status: int, code: str) -> dict[str, str]:
    got, headers, body = parse(response)
    assert got == status, response[:300]
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == code and error["type"] and error["message"] and error["param"] is None
    return headers


def head_of_size(size: int) -> bytes:
    """GET /healthz whose head is `size` bytes as the limit counts them (the target, and each header plus 4)."""
    target, fixed = b"/healthz", [(b"host", b"x"), (b"connection", b"close")]
    pad = size - len(target) - sum(len(k) + len(v) + 4 for k, v in fixed) - (len(b"x-pad") + 4)
    lines = b"".join(b"%s: %s\r\n" % kv for kv in [*fixed, (b"x-pad", b"p" * pad)])
    return b"GET %s HTTP/1.1\r\n%s\r\n" % (target, lines)


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 * MIB) + b"\r\n\r\n", id="one-8MiB"),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"x%06d: v\r\n" % i for i in range(8 * MIB // 12)),
            id="8MiB-of-small-headers",
        ),
        pytest.param(b"GET /" + b"a" * (8 * MIB) + b" HTTP/1.1\r\nHost: x\r\n\r\n", id="8MiB-target"),
    ],
)
def test_a_huge_head_is_refused_as_it_arrives_without_the_memory_it_asks_for(
    gateway: GatewayProcess, head: bytes
) -> None:
    gateway.reset_peak_memory()
    before = gateway.peak_memory_kib()
    with gateway.connect() as sock:
        sent, answer = send_until_answered(sock, head)
    assert_envelope(answer, 431, "headers_too_large")
    # The kernel's buffers on both sides hold a few MiB; a server that reads the whole head answers after all of it.
    assert sent < len(head) / 2, f"the answer came only after {sent} of {len(head)} bytes"
    assert gateway.peak_memory_kib() - before < MEMORY_ALLOWANCE_KIB


@pytest.mark.parametrize("piece", [LIMIT * 2, 1000], ids=["one-read", "many-reads"])
def test_the_limit_is_exact_however_the_head_arrives(gateway: GatewayProcess, piece: int) -> None:
    for size, status in ((LIMIT, 200), (LIMIT + 1, 431)):
        head = head_of_size(size)
        with gateway.connect() as sock:
            for start in range(0, len(head), piece):
                sock.sendall(head[start : start + piece])
                time.sleep(0.001)
            answer = read_all(sock)
        assert parse(answer)[0] == status, f"a head of {size} bytes got {answer[:60]!r}"


def test_a_slow_head_gets_408_and_the_connection_is_closed(gateway: GatewayProcess) -> None:
    with gateway.connect() as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        # A header line every 0.2 s: never idle, never done.
        while not select.select([sock], [], [], 0.2)[0] and time.monotonic() - start < 10:
            sock.sendall(b"x-drip: 1\r\n")
        answer = read_all(sock)
        elapsed = time.monotonic() - start
    assert_envelope(answer, 408, "request_timeout")
    assert HEADER_TIMEOUT - 0.2 < elapsed < HEADER_TIMEOUT + 1.5


def test_a_silent_connection_is_closed_without_an_answer(gateway: GatewayProcess) -> None:
    with gateway.connect() as sock:
        start = time.monotonic()
        assert read_all(sock) == b""
        elapsed = time.monotonic() - start
    assert HEADER_TIMEOUT - 0.2 < elapsed < HEADER_TIMEOUT + 1.5


def chat_head(gateway: GatewayProcess, length: int) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {gateway.key}\r\nContent-Length: {length}\r\n\r\n".encode()
    )


def test_a_slow_body_gets_408_and_the_connection_is_closed(gateway: GatewayProcess) -> None:
    with gateway.connect() as sock:
        sock.sendall(chat_head(gateway, 1000) + b"{")
        start = time.monotonic()
        while not select.select([sock], [], [], 0.2)[0] and time.monotonic() - start < 10:
            sock.sendall(b" ")
        answer = read_all(sock)
        elapsed = time.monotonic() - start
    assert_envelope(answer, 408, "request_timeout")
    assert BODY_TIMEOUT - 0.2 < elapsed < BODY_TIMEOUT + 1.5


def test_a_body_that_keeps_the_minimum_rate_may_take_longer_than_the_timeout(gateway: GatewayProcess) -> None:
    content = "x" * 6000
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()
    with gateway.connect() as sock:
        sock.sendall(chat_head(gateway, len(body)))
        start = time.monotonic()
        # About 4,000 bytes/s, four times the minimum rate, for ~1.5 s in all: longer than the body timeout.
        for offset in range(0, len(body), 1000):
            sock.sendall(body[offset : offset + 1000])
            time.sleep(0.25)
        assert time.monotonic() - start > BODY_TIMEOUT
        sock.shutdown(socket.SHUT_WR)
        status, _, reply = parse(read_all(sock))
    assert status == 200, reply
    assert json.loads(reply)["choices"][0]["message"]["content"]


def test_keep_alive_and_pipelined_requests_still_work(gateway: GatewayProcess) -> None:
    with httpx.Client(base_url=gateway.url) as client:
        assert all(client.get("/healthz").status_code == 200 for _ in range(20))
    with gateway.connect() as sock:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request + request + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(sock).count(b"HTTP/1.1 200 ") == 3


def test_past_the_connection_cap_new_connections_get_503_with_retry_after(tmp_path: Path, engine_url: str) -> None:
    cap = 4
    with gateway_process(tmp_path, engine_url, max_connections=cap, header_timeout=10) as gw:
        held = [gw.connect() for _ in range(cap)]
        time.sleep(0.3)  # accepted by the gateway, not only by the kernel
        refused = httpx.get(f"{gw.url}/healthz", timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_connections"
        for sock in held[:2]:
            sock.close()
        deadline = time.monotonic() + 5
        while httpx.get(f"{gw.url}/healthz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "closed connections did not free their places"
            time.sleep(0.1)
        for sock in held[2:]:
            sock.close()


def test_the_drain_does_not_wait_for_a_body_that_has_not_arrived(tmp_path: Path, engine_url: str) -> None:
    drain_timeout = 20
    with gateway_process(tmp_path, engine_url, drain_timeout=drain_timeout, body_timeout=60) as gw:
        with gw.connect() as sock:
            sock.sendall(chat_head(gw, 1000) + b"{")
            time.sleep(0.5)
            start = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            code = gw.proc.wait(timeout=drain_timeout + 10)
            elapsed = time.monotonic() - start
        assert code == 0, gw.log()
        assert elapsed < drain_timeout / 2, f"the drain waited {elapsed:.1f}s for a body still on its way"


async def echo_length(scope: dict[str, object], receive: object, send: object) -> None:
    """Reads the whole body and answers with its length."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()  # type: ignore[operator]
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": str(size).encode()})  # type: ignore[operator]


def wait_until_none_admitted(stats: ConnectionStats) -> None:
    deadline = time.monotonic() + 5
    while stats.admitted:
        assert time.monotonic() < deadline, f"{stats.admitted} connections still counted"
        time.sleep(0.02)


def test_what_the_server_refuses_is_counted_for_metrics() -> None:
    protocol = bounded_protocol(
        HttpLimits(max_head_bytes=1024, header_timeout=1.0, body_timeout=0.5, body_min_rate=1000, max_connections=3)
    )
    stats = protocol.stats
    with run_server(echo_length, http=protocol, ws="none", lifespan="off") as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.2)
        assert stats.admitted == 3
        assert httpx.get(url, timeout=10).status_code == 503
        for sock in held:
            sock.close()
        wait_until_none_admitted(stats)
        assert httpx.post(url, content=b"x" * 5000, timeout=10).text == "5000"
        assert httpx.get(url, headers={"x-big": "a" * 2000}, timeout=10).status_code == 431
        slow_head, slow_body, silent = (socket.create_connection(("127.0.0.1", port)) for _ in range(3))
        slow_head.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        slow_body.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        for sock in (slow_head, slow_body, silent):
            read_all(sock)
            sock.close()
        wait_until_none_admitted(stats)
    assert stats.refused == {
        "too_many_connections": 1,
        "headers_too_large": 1,
        "head_timeout": 1,
        "body_timeout": 1,
        "silent": 1,
    }


def test_the_servers_own_refusals_show_in_the_gateways_metrics(gateway: GatewayProcess) -> None:
    def refused(text: str) -> float:
        return metric_sum(text, "gateway_http_refused_total", reason="headers_too_large")

    before = refused(httpx.get(f"{gateway.url}/metrics").text)
    with gateway.connect() as sock:
        _, answer = send_until_answered(sock, head_of_size(LIMIT + 1))
    assert_envelope(answer, 431, "headers_too_large")
    text = httpx.get(f"{gateway.url}/metrics").text
    assert refused(text) == before + 1
    assert metric_sum(text, "gateway_http_connections") >= 1  # the scrape's own connection


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout_and_a_busy_one_is_not(
    tmp_path: Path, engine_url: str
) -> None:
    keep_alive = 1.0
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with gateway_process(tmp_path, engine_url, keep_alive_timeout=keep_alive) as gw:
        # Busy: a request every 0.4 s for three timeouts' worth, all on one connection.
        with gw.connect() as sock:
            sock.settimeout(5)
            for _ in range(8):
                sock.sendall(request)
                reply = b""
                while b'{"status":"ok"}' not in reply:
                    chunk = sock.recv(65536)
                    assert chunk, "the server closed a connection that was in use"
                    reply += chunk
                answered = time.monotonic()
                time.sleep(0.4)
            # Idle since the last answer: closed once the timeout has passed since then, not before.
            assert read_all(sock, timeout=10) == b""
            idle = time.monotonic() - answered
        assert keep_alive * 0.9 <= idle < keep_alive + 2, idle
