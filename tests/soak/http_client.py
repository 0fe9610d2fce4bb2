"""A small HTTP/1.1 client on one socket: the soak's users can hang up at any byte and read as slowly as they like."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator


class Closed(Exception):
    """The server closed the connection before the answer was complete."""


class Connection:
    """One keep-alive connection; `reusable` says whether the last answer was read to its end on an open socket.

    `rcvbuf` shrinks the socket's receive buffer (a slow reader then backs up into the server's buffers instead of
    into ours); `pause` sleeps before each read of at most `read_size` bytes.
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        rcvbuf: int | None = None,
        read_size: int = 65536,
        pause: float = 0.0,
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect: the window scale is agreed in the handshake.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.authority = f"{host}:{port}".encode()
        self.read_size = read_size
        self.pause = pause
        self.buf = b""
        self.reusable = False
        self.closed = False
        self._length: int | None = None
        self._chunked = False
        self._keep = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.reusable = False
            self.sock.close()

    def request(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.reusable = False
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.authority.decode()}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _fill(self) -> None:
        if self.pause:
            time.sleep(self.pause)
        data = self.sock.recv(self.read_size)
        if not data:
            raise Closed("connection closed by the server")
        self.buf += data

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line, self.buf = self.buf[:end], self.buf[end + 2 :]
        return line

    def head(self) -> tuple[int, dict[str, str]]:
        """The status and headers (lower-case names) of the answer."""
        status_line = self._line()
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._length = int(length) if length is not None and not self._chunked else None
        self._keep = headers.get("connection", "").lower() != "close"
        return int(status_line.split(b" ", 2)[1]), headers

    def body(self) -> Iterator[bytes]:
        """The answer's body as it arrives (chunked framing removed); at its end the connection may be reused."""
        if self._chunked:
            yield from self._chunks()
        elif self._length is not None:
            remaining = self._length
            while remaining:
                if not self.buf:
                    self._fill()
                piece, self.buf = self.buf[:remaining], self.buf[remaining:]
                remaining -= len(piece)
                yield piece
        else:
            # Neither framing: the body ends when the server closes.
            self._keep = False
            while True:
                try:
                    self._fill()
                except Closed:
                    break
                piece, self.buf = self.buf, b""
                yield piece
        self.reusable = self._keep and not self.closed

    def _chunks(self) -> Iterator[bytes]:
        while True:
            size = int(self._line().split(b";", 1)[0], 16)
            if size == 0:
                while self._line():  # trailers, then the blank line
                    pass
                return
            remaining = size
            while remaining:
                if not self.buf:
                    self._fill()
                piece, self.buf = self.buf[:remaining], self.buf[remaining:]
                remaining -= len(piece)
                yield piece
            self._line()
