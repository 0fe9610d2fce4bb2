"""The gateway's HTTP/1.1 response writer: uvicorn's request cycle with a cheaper `send` for the gateway's answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

# An answer's head and first body bytes go out in one write below this size (above it, copying them costs more).
JOIN_BELOW = 64 * 1024


class LeanCycle(RequestResponseCycle):
    """uvicorn's request cycle with a cheaper `send`, for answers whose headers the gateway writes itself.

    The head is held back and goes out with the first body bytes in one write (one send on the socket, not two).
    Header names come from the gateway's own code; values are checked for line breaks once, on the joined head,
    instead of by two regular expressions per header.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head = b""

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got {message['type']!r}.")
            self.response_started = True
            self.waiting_for_100_continue = False
            self._head = self._build_head(message["status"], message.get("headers", ()))
            return
        if self.response_complete or message["type"] != "http.response.body":
            raise RuntimeError(f"Unexpected ASGI message {message['type']!r} for this response.")
        body: bytes = message.get("body", b"")
        more_body: bool = message.get("more_body", False)
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            data = b""
        elif self.chunked_encoding:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more_body:
                data += b"0\r\n\r\n"
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            data = body
        head = self._head
        if head:
            self._head = b""
            if len(data) < JOIN_BELOW:
                data = head + data
            else:
                self.transport.write(head)
        if data:
            self.transport.write(data)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    def _build_head(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
        parts = [STATUS_LINE[status]]
        close = False
        for name, value in (*headers, *self.default_headers):
            if name == b"content-length":
                if self.chunked_encoding is None:
                    self.expected_content_length = int(value)
                    self.chunked_encoding = False
            elif name == b"connection":
                close = b"close" in value.lower()
            parts.append(b"%b: %b\r\n" % (name, value))
        if close:
            self.keep_alive = False
        elif not self.keep_alive:
            parts.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked_encoding = True
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        # Each part is one line ending in CRLF: a name or value with a CR, LF or NUL of its own adds to these counts.
        lines = len(parts)
        if head.count(b"\n") != lines or head.count(b"\r") != lines or b"\x00" in head:
            raise RuntimeError("Invalid HTTP header value.")
        return head
