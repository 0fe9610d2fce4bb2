"""A fault-injecting stand-in for a vLLM engine (fault tests only; happy paths also run against real vLLM)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class FakeEngine:
    healthy: bool = True
    # Fail the health check too once this many requests have been answered (set with the failing mode, so that
    # no check can see the engine sick before the requests that eject it, nor well after them).
    sick_after: int | None = None
    # "ok"; "status" (answer with `status`); "die" (break the connection mid-stream); "hang" (never send
    # headers); "stall" (stop sending after the first token)
    mode: str = "ok"
    status: int = 500
    chunks: int = 3
    delay: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    aborted: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    sent_at: list[float] = field(default_factory=list)
    # SSE framing variants the spec allows: CRLF line ends, and no blank line after the last event.
    crlf: bool = False
    end_blank_line: bool = True
    # Deltas to stream instead of "tok0", "tok1", ... (reasoning or tool-call deltas, say).
    deltas: list[dict[str, Any]] | None = None
    # Bytes of one event that never ends (no blank line), sent in 64 KiB chunks after the role event.
    endless_event: int = 0

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/health", self.health),
                Route("/v1/chat/completions", self.generate, methods=["POST"]),
                Route("/v1/completions", self.generate, methods=["POST"]),
            ]
        )

    async def health(self, _: Request) -> Response:
        sick = self.sick_after is not None and len(self.requests) >= self.sick_after
        return Response(status_code=200 if self.healthy and not sick else 503)

    async def generate(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.mode == "hang":
            # Never answer, but notice (as vLLM does) when the caller closes the connection.
            while not await request.is_disconnected():  # noqa: ASYNC110 (polling is how Starlette exposes it)
                await asyncio.sleep(0.05)
            self.aborted.set()
            return Response(status_code=499)
        if self.mode == "status":
            error = {"error": {"message": f"fake says {self.status}", "type": "X", "param": None, "code": None}}
            return JSONResponse(error, status_code=self.status)
        usage = {"prompt_tokens": 7, "completion_tokens": self.chunks, "total_tokens": 7 + self.chunks}
        if not body.get("stream"):
            await asyncio.sleep(self.delay)
            text = "".join(f"tok{i} " for i in range(self.chunks))
            message = {"role": "assistant", "content": text}
            return JSONResponse(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message}],
                    "usage": usage,
                }
            )
        return StreamingResponse(self.stream(body, usage), media_type="text/event-stream")

    async def stream(self, body: dict[str, Any], usage: dict[str, int]) -> AsyncIterator[bytes]:
        def event(data: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(data).encode() + (b"\r\n\r\n" if self.crlf else b"\n\n")

        base = {"id": "x", "object": "chat.completion.chunk", "model": body["model"]}
        try:
            yield event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            if self.endless_event:
                yield b'data: {"choices":[{"index":0,"delta":{"content":"'
                for _ in range(self.endless_event // 65536):
                    yield b"x" * 65536
                self.finished.set()
                return
            deltas = self.deltas or [{"content": f"tok{i} "} for i in range(self.chunks)]
            for i, delta in enumerate(deltas):
                await asyncio.sleep(self.delay)
                if self.mode == "die" and i == 1:
                    raise RuntimeError("fake engine dies mid-stream")
                if self.mode == "stall" and i == 1:
                    await asyncio.sleep(3600)
                self.sent_at.append(time.monotonic())
                yield event({**base, "choices": [{"index": 0, "delta": delta}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                last = event({**base, "choices": [], "usage": usage})
                yield last if self.end_blank_line else last.rstrip()
            if self.end_blank_line:
                yield b"data: [DONE]\n\n"
            self.finished.set()
        except asyncio.CancelledError:
            self.aborted.set()
            raise
