"""Loopback stand-ins for the load-test client: streams of every output kind, and a quality-set oracle."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loadtests.quality import questions


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def delta(**fields: Any) -> bytes:
    return event({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": fields}]})


def tool_call(arguments: str, name: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    return {"index": 0, "id": "call_1", "type": "function", "function": function}


@dataclass
class ScriptedEngine:
    """Streams `chunks` output events `delay` seconds apart, the first `first_delay` after the role chunk.

    `kind` is what the events carry: "content", "reasoning" (reasoning_content, then content) or "tool_call"
    (a function call's name and arguments, no content at all). Non-streamed questions of the quality set get a
    sentence with the right answer, except those in `wrong` (or all of them when `wrong_all`).
    """

    kind: str = "content"
    chunks: int = 5
    delay: float = 0.1
    first_delay: float | None = None
    wrong: set[str] = field(default_factory=set)
    wrong_all: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/health", self.health),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
            ]
        )

    async def health(self, _: Request) -> Response:
        return Response(status_code=200)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": 7, "completion_tokens": self.chunks, "total_tokens": 7 + self.chunks}

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        if body.get("stream"):
            return StreamingResponse(self.stream(body), media_type="text/event-stream")
        return JSONResponse(
            {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer(body)}}],
                "usage": self.usage(),
            }
        )

    def answer(self, body: dict[str, Any]) -> str:
        asked = body["messages"][-1]["content"]
        for q in questions():
            if q.prompt == asked:  # what the quality check sends: the question and the set's instruction
                if self.wrong_all or q.id in self.wrong:
                    return "I am not sure, maybe something else."
                return f"Sure! The answer is {q.answer}."
        return "tok " * self.chunks

    def piece(self, i: int) -> bytes:
        if self.kind == "tool_call":
            call = tool_call("", name="get_weather") if i == 0 else tool_call(f'"part{i}"')
            return delta(tool_calls=[call])
        if self.kind == "reasoning" and i < self.chunks // 2:
            return delta(reasoning_content=f"thought{i} ")
        return delta(content=f"tok{i} ")

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        yield delta(role="assistant", content=None if self.kind == "tool_call" else "")
        for i in range(self.chunks):
            await asyncio.sleep(self.first_delay if i == 0 and self.first_delay is not None else self.delay)
            yield self.piece(i)
        yield event(
            {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            yield event({"object": "chat.completion.chunk", "choices": [], "usage": self.usage()})
        yield b"data: [DONE]\n\n"
