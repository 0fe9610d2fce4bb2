"""A lean HTTP/1.1 client for engine traffic: keep-alive connections per endpoint, httptools parsing, no copies.

General clients pay per request for what a proxy does not need (connection-pool scans across thousands of slots,
redirects, cookies, proxies from the environment). This one does exactly what the gateway asks of an engine: POST
a body, get the status, read or stream the body, and close the connection when the answer is abandoned (which is
what makes vLLM abort the generation). A response read to its end puts its connection back for the next request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from typing import cast
from urllib.parse import urlsplit

import httptools

from serve.gateway.upstream import ConnectFailed, EngineBroken

log = logging.getLogger(__name__)

# Buffered body bytes past which the engine's socket stops being read until the relay catches up.
HIGH_WATER = 256 * 1024
# Idle keep-alive connections kept per endpoint; in-flight connections are not capped here (leases cap them).
MAX_IDLE_PER_ENDPOINT = 256


class _Connection(asyncio.Protocol):
    """One TCP connection to an engine, carrying one request at a time."""

    def __init__(self, pool: _EndpointPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.response: EngineHttpResponse | None = None
        self.reused = False
        self.paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A request is written at once; Nagle would hold its tail for the engine's delayed ACK (~40 ms).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(EngineBroken(f"bad HTTP from the engine: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(EngineBroken("the engine closed the connection"))

    def _fail(self, exc: Exception) -> None:
        if self.response is not None and not self.response.complete:
            self.response.fail(exc)

    # httptools callbacks
    def on_headers_complete(self) -> None:
        if self.response is not None:
            self.response.head(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response.feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None:
            return
        keep = self.parser.should_keep_alive()
        response.finish()
        if not keep:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.lost = True
            self.transport.close()

    def pause(self) -> None:
        if self.transport is not None and not self.lost and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            self.transport.resume_reading()


class EngineHttpResponse:
    """One engine answer: the status once its head has arrived, then the body as it comes."""

    __slots__ = ("_conn", "_loop", "_chunks", "_buffered", "_waiter", "_error", "status", "complete", "_closed")

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._loop = loop
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self.status = 0
        self.complete = False
        self._closed = False

    # From the protocol
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def head(self, status: int) -> None:
        self.status = status
        self._wake()

    def feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    # For the proxy
    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def wait_head(self) -> None:
        while not self.status:
            if self._error is not None:
                raise self._error
            await self._wait()

    def __aiter__(self) -> EngineHttpResponse:
        return self

    async def __anext__(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                # What has arrived goes out together: one event split and one client write, not one per chunk.
                chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._conn.paused:
                    self._conn.resume()
                return chunk
            if self.complete:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            # `_wait` inlined: this runs once per arriving chunk of every stream.
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def chunks(self) -> EngineHttpResponse:
        return self

    async def read(self, limit: int | None = None) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in self:
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size >= limit:
                return b"".join(parts)[:limit]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        """Back to the pool if the answer was read to its end; otherwise the connection is closed (vLLM aborts)."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        conn.response = None
        if self.complete and not conn.lost and not self._chunks:
            conn.pool.put(conn)
        else:
            conn.close()


class _EndpointPool:
    def __init__(self, client: EngineHttpClient, host: str, port: int, authority: bytes) -> None:
        self.client = client
        self.host = host
        self.port = port
        self.authority = authority
        self.idle: list[_Connection] = []

    def put(self, conn: _Connection) -> None:
        if len(self.idle) < MAX_IDLE_PER_ENDPOINT:
            conn.reused = True
            self.idle.append(conn)
        else:
            conn.close()

    def take(self) -> _Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.lost:
                return conn
        return None

    async def connect(self, within: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(within):
                _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        return conn

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class EngineHttpClient:
    """Engine requests over keep-alive connections, one pool of idle connections per endpoint."""

    def __init__(self) -> None:
        self._pools: dict[str, tuple[_EndpointPool, bytes]] = {}

    def _pool_for(self, url: str) -> tuple[_EndpointPool, bytes]:
        """The endpoint pool and the request target for a full URL (cached: a gateway sees few distinct URLs)."""
        found = self._pools.get(url)
        if found is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or parts.hostname is None:
                raise ConnectFailed(f"unsupported engine URL {url!r} (http://host:port only)")
            port = parts.port or 80
            authority = f"{parts.hostname}:{port}" if ":" not in parts.hostname else f"[{parts.hostname}]:{port}"
            key = f"{parts.hostname}|{port}"
            pool = next((p for p, _ in self._pools.values() if f"{p.host}|{p.port}" == key), None)
            if pool is None:
                pool = _EndpointPool(self, parts.hostname, port, authority.encode())
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            found = (pool, target.encode())
            self._pools[url] = found
        return found

    async def post(self, url: str, body: bytes, headers: dict[str, str], connect_timeout: float) -> EngineHttpResponse:
        pool, target = self._pool_for(url)
        head = [
            b"POST ",
            target,
            b" HTTP/1.1\r\nhost: ",
            pool.authority,
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
        ]
        for name, value in headers.items():
            head += (b"\r\n", name.encode("latin-1"), b": ", value.encode("latin-1"))
        head.append(b"\r\n\r\n")
        request = b"".join(head)
        loop = asyncio.get_running_loop()
        conn = pool.take()
        for _ in range(2):
            if conn is None:
                conn = await pool.connect(connect_timeout)
            response = EngineHttpResponse(conn, loop)
            conn.response = response
            transport = conn.transport
            assert transport is not None
            transport.write(request + body if len(body) < 65536 else request)
            if len(body) >= 65536:
                transport.write(body)
            try:
                await response.wait_head()
            except EngineBroken:
                # A kept-alive connection the engine had closed while idle: it never saw this request.
                if conn.reused and not response.status:
                    conn.close()
                    conn = None
                    continue
                raise
            except BaseException:
                conn.response = None
                conn.close()
                raise
            return response
        raise EngineBroken("the engine closed the connection")

    async def aclose(self) -> None:
        for pool, _ in self._pools.values():
            pool.close()
        self._pools.clear()
