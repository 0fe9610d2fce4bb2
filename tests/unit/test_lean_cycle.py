"""The gateway's response writer: the head goes out with the first body bytes, and a header cannot split it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import FlowControl

from serve.gateway.http_writer import LeanCycle


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def cycle(transport: Transport, method: str = "POST") -> LeanCycle:
    return LeanCycle(
        scope={"method": method, "http_version": "1.1"},
        transport=transport,
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=None,
        access_logger=None,
        access_log=False,
        default_headers=[(b"date", b"Sun, 06 Dec 2026 05:00:00 GMT")],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=True,
        on_response=lambda: None,
    )


def test_a_plain_answer_is_one_write_with_its_head() -> None:
    async def body() -> None:
        t = Transport()
        c = cycle(t)
        await c.send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        assert t.writes == []
        await c.send({"type": "http.response.body", "body": b"ok"})
        assert len(t.writes) == 1 and t.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert t.writes[0].endswith(b"date: Sun, 06 Dec 2026 05:00:00 GMT\r\n\r\nok") and c.response_complete

    asyncio.run(body())


def test_a_stream_is_chunked_and_ends_with_the_last_chunk() -> None:
    async def body() -> None:
        t = Transport()
        c = cycle(t)
        sse = [(b"content-type", b"text/event-stream")]
        await c.send({"type": "http.response.start", "status": 200, "headers": sse})
        await c.send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        await c.send({"type": "http.response.body", "body": b"", "more_body": False})
        assert b"transfer-encoding: chunked\r\n" in t.writes[0]
        assert t.writes[0].endswith(b"\r\n\r\n9\r\ndata: x\n\n\r\n")
        assert t.writes[1] == b"0\r\n\r\n" and c.response_complete

    asyncio.run(body())


@pytest.mark.parametrize("value", [b"a\r\nset-cookie: x=1", b"a\nb", b"a\rb", b"a\x00b"])
def test_a_header_value_that_would_split_the_head_is_refused(value: bytes) -> None:
    async def body() -> None:
        c = cycle(Transport())
        with pytest.raises(RuntimeError, match="Invalid HTTP header value"):
            await c.send({"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", value)]})

    asyncio.run(body())
