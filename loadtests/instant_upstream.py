"""An instant OpenAI-compatible upstream: precomputed chat completions on a raw asyncio protocol, for cost benchmarks.

It shares a core with the load generator in `llmserve bench gateway`, so it does as little as it can per request:
no HTTP framework, no JSON parsing, responses built once at start. It answers `GET /health` and
`POST /v1/chat/completions`, plain or streamed (`"stream": true` anywhere in the body): a stream is
`--events` content events, one usage event and `data: [DONE]`, each event its own HTTP chunk written with its own
send, as a server that flushes every token does; nothing waits between them.

    python -m loadtests.instant_upstream --port 8100
    python -m loadtests.instant_upstream --port 8100 --server starlette   # the same answers, framework-served

`--server starlette` serves the same bytes from a Starlette app under uvicorn (one JSON parse per request, a
StreamingResponse of the events): the kind of upstream a Python engine server is, and the reference the gateway's
req/s targets were first set against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
from typing import Any, cast

DEFAULT_EVENTS = 16
PROMPT_TOKENS = 8
# Whitespace a JSON writer may put around the colon (a proxy may re-serialise the body).
STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
MAX_HEAD_BYTES = 64 * 1024


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Responses:
    """Every byte the upstream sends, built once."""

    def __init__(self, model: str, events: int) -> None:
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": events, "total_tokens": PROMPT_TOKENS + events}
        common = {"id": "chatcmpl-instant", "created": 0, "model": model}
        message = {"role": "assistant", "content": "tok " * events}
        body = _json(
            {
                **common,
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "length"}],
                "usage": usage,
            }
        )
        self.plain = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
        chunk = {**common, "object": "chat.completion.chunk"}
        content = _json({**chunk, "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]})
        final = _json({**chunk, "choices": [], "usage": usage})
        # The head travels with the first event, as a server flushing the status line with the first token does.
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        writes = [_chunk(b"data: " + content + b"\n\n")] * events
        writes[0] = head + writes[0] if writes else head
        writes.append(_chunk(b"data: " + final + b"\n\n"))
        writes.append(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.stream = tuple(writes)
        self.health = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        self.not_found = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
        self.bad_request = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining, Content-Length bodies only (what load generators and proxies send)."""

    __slots__ = ("buffer", "responses", "transport")

    def __init__(self, responses: Responses) -> None:
        self.responses = responses
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, though they behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    self._refuse()
                    return
                break
            head = buf[:end].lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                try:
                    length = int(head[at + 17 : stop if stop >= 0 else len(head)])
                except ValueError:
                    self._refuse()
                    return
            elif b"\r\ntransfer-encoding:" in head:
                self._refuse()
                return
            total = end + 4 + length
            if len(buf) < total:
                break
            self._answer(head, buf[end + 4 : total])
            if self.transport is None:
                return
            buf = buf[total:]
        self.buffer = buf

    def _answer(self, head: bytes, body: bytes) -> None:
        transport = self.transport
        assert transport is not None
        responses = self.responses
        if head.startswith(b"post /v1/chat/completions "):
            if STREAM_TRUE.search(body):
                for write in responses.stream:
                    transport.write(write)
            else:
                transport.write(responses.plain)
        elif head.startswith((b"get /health ", b"get /v1/models ")):
            transport.write(responses.health)
        else:
            transport.write(responses.not_found)
        if b"\r\nconnection: close" in head:
            transport.close()
            self.transport = None

    def _refuse(self) -> None:
        if self.transport is not None:
            self.transport.write(self.responses.bad_request)
            self.transport.close()
            self.transport = None
        self.buffer = b""


async def serve(host: str, port: int, responses: Responses) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(responses), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def starlette_app(responses: Responses) -> Any:
    """The same answers from a Starlette app (parsing each body, streaming each event with its own send)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    plain = responses.plain.split(b"\r\n\r\n", 1)[1]
    events = [_unchunk(write) for write in responses.stream]

    async def health(_: Request) -> Response:
        return Response(b"{}", media_type="application/json")

    async def chat(request: Request) -> Response:
        body = await request.json()
        if not body.get("stream"):
            return Response(plain, media_type="application/json")

        async def stream() -> Any:
            for event in events:
                yield event

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/health", health), Route("/v1/chat/completions", chat, methods=["POST"])])


def _unchunk(write: bytes) -> bytes:
    """The data of the first HTTP chunk in a precomputed write (its head, if any, left out)."""
    if write.startswith(b"HTTP/1.1"):
        write = write.split(b"\r\n\r\n", 1)[1]
    size, _, rest = write.partition(b"\r\n")
    return rest[: int(size, 16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the model name in responses")
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="content events per stream")
    parser.add_argument(
        "--server", choices=["raw", "starlette"], default="raw", help="a raw protocol, or Starlette under uvicorn"
    )
    args = parser.parse_args()
    responses = Responses(args.model, args.events)
    if args.server == "starlette":
        import uvicorn

        uvicorn.run(starlette_app(responses), host=args.host, port=args.port, log_level="warning", access_log=False)
        return
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] brings it; without it the stdlib loop still works, only slower.
        asyncio.run(serve(args.host, args.port, responses))
    else:
        uvloop.run(serve(args.host, args.port, responses))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
