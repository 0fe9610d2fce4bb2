"""The gateway's HTTP/1.1 protocol: uvicorn's httptools one with a bounded head, read timeouts, a connection cap, one
keep-alive timer per connection and the lean response writer (serve.gateway.http_writer)."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from serve.gateway.http_writer import LeanCycle

# A connection past the cap is answered once its head is in; one that sends nothing for this long is just closed.
REFUSED_HEAD_WAIT = 1.0
# After answering in place of the application, input is read and dropped (for this long, up to this much) before the
# close, so the answer is not lost to a reset: closing a socket with unread input resets it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 * 1024
# Bytes of a head on the wire that its counted size (target and headers) leaves out: method, version, line ends.
HEAD_FRAMING_SLACK = 256


@dataclass(frozen=True)
class HttpLimits:
    """What one server allows a client connection (GatewayFile holds the defaults)."""

    max_head_bytes: int
    header_timeout: float
    body_timeout: float
    body_min_rate: int
    max_connections: int


class ConnectionStats:
    """One server's connections under its cap (those refused past it are not counted), and what it refused itself,
    by reason: `headers_too_large`, `head_timeout`, `body_timeout`, `too_many_connections`, `silent` (closed unasked).
    Plain numbers, for a metrics collector to read at scrape time."""

    def __init__(self) -> None:
        self.admitted = 0
        self.refused: dict[str, int] = {}

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


class _Answered(Exception):
    """Raised in a parser callback to stop parsing a request the protocol has answered itself."""


def envelope(
    status: int, error_type: str, code: str, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> bytes:
    """A whole response with the OpenAI error envelope that closes the connection: written before any app runs."""
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}}).encode()
    head = [
        STATUS_LINE[status],
        *(b"%s: %s\r\n" % (name, value) for name, value in headers),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Counts a request head's bytes as they arrive and answers 431 as soon as they pass the limit (httptools itself
    buffers a head of any size); answers 408 to a head or a body that does not arrive in time, and 503 past the
    connection cap. Timers are only armed when a head or body spans reads, so the usual request costs none."""

    limits: ClassVar[HttpLimits]
    stats: ClassVar[ConnectionStats]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # Between requests every byte that arrives belongs to a head.
        self._head_open = True
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False
        self._answered = False
        self._dropped = 0
        # When the body that spans reads began to arrive, and how much of it came since.
        self._body_started = 0.0
        self._body_bytes = 0
        # Since when the connection has waited for its next request (None while a request is under way).
        self._idle_since: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.stats.admitted < self.limits.max_connections:
            self.stats.admitted += 1
            self._counted = True
            wait = self.limits.header_timeout
        else:
            wait = min(REFUSED_HEAD_WAIT, self.limits.header_timeout)
        self._timer = self.loop.call_later(wait, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.stats.admitted -= 1
        self._cancel_timer()
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        super().connection_lost(exc)

    # Keep-alive: one timer per connection, re-armed when it fires early, instead of a timer armed after every
    # answer and cancelled by the next request's first bytes.
    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._keep_alive_due)

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None or self.transport.is_closing():
            return  # busy: the next answer arms the timer again
        rest = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if rest > 0:
            self.timeout_keep_alive_task = self.loop.call_later(rest, self._keep_alive_due)
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._answered:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        if self._head_open:
            self._head_bytes += len(data)
        else:
            self._body_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The gateway serves no WebSocket: the request goes on as a plain one, as uvicorn does.
            self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if not self._answered:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._answered:
            return
        if self._head_open:
            if self._head_bytes > self.limits.max_head_bytes + HEAD_FRAMING_SLACK:
                self._answer_too_large()
            elif self._timer is None and self._head_bytes:
                self._timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)
        elif self._timer is None and not self.transport.is_closing():
            self._start_body_clock()

    # The two callbacks below run for every request: the usual one takes no call beyond uvicorn's own.
    def on_headers_complete(self) -> None:
        self._head_open = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._head_bytes > self.limits.max_head_bytes or not self._counted:
            self._check_head()
        self._begin_request()

    def _begin_request(self) -> None:
        """The request's scope and its cycle, as uvicorn makes them, less what the gateway never uses (WebSocket
        upgrades, uvicorn's own concurrency limit, a root path)."""
        parser, scope = self.parser, self.scope
        scope["method"] = parser.get_method().decode("ascii")
        http_version = parser.get_http_version()
        if http_version != "1.1":
            scope["http_version"] = http_version
        url = httptools.parse_url(self.url)
        raw_path = url.path
        path = raw_path.decode("ascii")
        scope["path"] = urllib.parse.unquote(path) if "%" in path else path
        scope["raw_path"] = raw_path
        scope["query_string"] = url.query or b""
        existing = self.cycle
        self.cycle = LeanCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=False,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, self.app)
        else:
            # A pipelined request waits for the answer in progress.
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def on_message_complete(self) -> None:
        self._head_open = True
        self._head_bytes = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        HttpToolsProtocol.on_message_complete(self)

    def _check_head(self) -> None:
        """A head that came in a large read, or on a connection past the cap: answered here if it must be."""
        # The exact size is only worth computing when the read that ended the head was large.
        if self._head_bytes > self.limits.max_head_bytes and self._head_size() > self.limits.max_head_bytes:
            self._answer_too_large()
            raise _Answered
        if not self._counted:
            self._answer(
                "too_many_connections",
                503,
                "service_unavailable",
                "too_many_connections",
                f"the gateway holds its maximum of {self.limits.max_connections} connections: retry shortly",
                [(b"retry-after", b"1")],
            )
            raise _Answered

    def _head_size(self) -> int:
        """The head as the limit counts it: the request target and each header with its separator and line end."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head: its clock starts when the response in progress ends.
            self._timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)
            return
        if not self._head_bytes or not self._counted:
            # Nothing was asked (or the connection is past the cap): there is nothing to answer.
            self._answered = True
            self.stats.refuse("silent" if self._counted else "too_many_connections")
            self.transport.close()
            return
        limit = self.limits.header_timeout
        message = f"the request head took longer than {limit:g}s"
        self._answer("head_timeout", 408, "invalid_request_error", "request_timeout", message)

    def _start_body_clock(self) -> None:
        self._body_started = self.loop.time()
        self._body_bytes = 0
        self._timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)

    def _body_timed_out(self) -> None:
        """The body may take body_timeout seconds, and one more for every body_min_rate bytes that arrived."""
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle.response_complete:
            # The application answered without reading the whole body: the rest is not worth waiting for.
            self._answered = True
            self.transport.close()
            return
        if self.flow.read_paused:
            # The application has not taken what already came: the client is not the slow one. Start again.
            self._start_body_clock()
            return
        limits = self.limits
        late = self.loop.time() - self._body_started - limits.body_timeout - self._body_bytes / limits.body_min_rate
        if late < 0:
            self._timer = self.loop.call_later(-late, self._body_timed_out)
            return
        self._answer(
            "body_timeout",
            408,
            "invalid_request_error",
            "request_timeout",
            f"the request body came slower than {limits.body_min_rate} bytes/s after {limits.body_timeout:g}s",
        )

    def _answer_too_large(self) -> None:
        limit = self.limits.max_head_bytes
        message = f"request headers are larger than {limit} bytes"
        self._answer("headers_too_large", 431, "invalid_request_error", "headers_too_large", message)

    def _answer(
        self,
        reason: str,
        status: int,
        error_type: str,
        code: str,
        message: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """Answers in place of the application, then closes: the rest of the input is never parsed."""
        self._answered = True
        self.stats.refuse(reason)
        self._cancel_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The application's receive() returns http.disconnect from now on, and its send() writes nothing.
            started = cycle.response_started
            cycle.disconnected = True
            cycle.message_event.set()
            if started:
                self.transport.close()
                return
        extra = [*self.server_state.default_headers, *headers]
        self.transport.write(envelope(status, error_type, code, message, extra))
        if self.transport.can_write_eof():
            self.flow.resume_reading()
            self.transport.write_eof()
            self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


def bounded_protocol(limits: HttpLimits) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for one server: its limits and its own connection figures (`.stats`)."""

    class Protocol(BoundedHttpToolsProtocol):
        pass

    Protocol.limits = limits
    Protocol.stats = ConnectionStats()
    return Protocol
