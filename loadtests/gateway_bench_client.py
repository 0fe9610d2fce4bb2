"""The gateway benchmark's own HTTP/1.1 client: one keep-alive socket, time to the first output event, checks.

Blocking sockets and a minimal response reader, so the client adds the same few microseconds to every target and
nothing of an HTTP library's own scheduling.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from serve.protocol.stream import EventSplitter, Kind, classify, usage_of

RECV_BYTES = 65536
TIMEOUT = 30.0


def request_bytes(url: str, body: bytes, key: str) -> bytes:
    host = urlsplit(url).netloc
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Exchange:
    status: int
    body: bytes
    # Seconds from sending the request to the first event that carries output (streams only).
    first_output: float | None = None
    kinds: list[Kind] = field(default_factory=list)
    usage: dict[str, object] | None = None


class Session:
    """One connection to one target, reopened when the server closed it between requests."""

    def __init__(self, url: str, request: bytes) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.request = request
        self.sock: socket.socket | None = None
        self.buf = b""
        self.answered = False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def read_more(self) -> bytes:
        assert self.sock is not None
        data = self.sock.recv(RECV_BYTES)
        if not data:
            raise ConnectionError(f"{self.address} closed the connection")
        self.answered = True
        return data

    def _connect(self) -> None:
        self.close()
        self.sock = socket.create_connection(self.address, timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def exchange(self) -> Exchange:
        """Send the request once and read the whole response."""
        fresh = self.sock is None
        if fresh:
            self._connect()
        try:
            return self._exchange()
        except ConnectionError:
            # A keep-alive connection the server closed while idle fails before any byte of the answer.
            if fresh or self.answered:
                raise
            self._connect()
            return self._exchange()

    def _exchange(self) -> Exchange:
        assert self.sock is not None
        self.answered = bool(self.buf)
        start = time.perf_counter()
        self.sock.sendall(self.request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self.buf += self.read_more()
        head, self.buf = self.buf[:end].lower(), self.buf[end + 4 :]
        status = int(head.split(b" ", 2)[1])
        result = Exchange(status=status, body=b"")
        splitter = EventSplitter() if b"text/event-stream" in head else None
        body = bytearray()
        for piece in ChunkReader(self) if b"transfer-encoding: chunked" in head else self._sized(head):
            body += piece
            if splitter is None:
                continue
            for event in splitter.feed(piece):
                kind = classify(event)
                if kind is Kind.OUTPUT and result.first_output is None:
                    result.first_output = time.perf_counter() - start
                elif kind is Kind.USAGE:
                    result.usage = usage_of(event)
                result.kinds.append(kind)
        result.body = bytes(body)
        if b"connection: close" in head:
            self.close()
        return result

    def _sized(self, head: bytes) -> list[bytes]:
        at = head.find(b"content-length:")
        length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
        while len(self.buf) < length:
            self.buf += self.read_more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return [body]


class ChunkReader:
    """Yields the decoded pieces of a chunked body as they arrive."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def __iter__(self) -> ChunkReader:
        return self

    def __next__(self) -> bytes:
        s = self.session
        while (eol := s.buf.find(b"\r\n")) < 0:
            s.buf += s.read_more()
        size = int(s.buf[:eol].split(b";", 1)[0], 16)
        if size == 0:
            # No trailers from the servers measured here: the empty line ends the body.
            while len(s.buf) < eol + 4:
                s.buf += s.read_more()
            s.buf = s.buf[eol + 4 :]
            raise StopIteration
        while len(s.buf) < eol + 2 + size + 2:
            s.buf += s.read_more()
        piece = s.buf[eol + 2 : eol + 2 + size]
        s.buf = s.buf[eol + 2 + size + 2 :]
        return piece


def check_exchange(target: str, exchange: Exchange, stream: bool, events: int) -> None:
    """Raise RuntimeError unless the response is the full answer the instant upstream gives."""
    problem = None
    if exchange.status != 200:
        problem = f"status {exchange.status}: {exchange.body[:500]!r}"
    elif stream:
        outputs = exchange.kinds.count(Kind.OUTPUT)
        if outputs != events or exchange.usage is None or Kind.DONE not in exchange.kinds:
            problem = f"{outputs} output events (expected {events}), usage {exchange.usage}, kinds {exchange.kinds}"
    else:
        try:
            content = json.loads(exchange.body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        if not content:
            problem = f"no message content in {exchange.body[:500]!r}"
    if problem:
        kind = "streamed" if stream else "plain"
        raise RuntimeError(f"{target}: a {kind} request did not get the expected answer: {problem}")
