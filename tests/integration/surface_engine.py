"""A stand-in engine for the embeddings, Responses, tokenizer and LoRA routes, recording what reaches it."""

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

from tests.integration.fake_engine import FakeEngine

USAGE = {"prompt_tokens": 11, "total_tokens": 11}


@dataclass
class SurfaceEngine(FakeEngine):
    # (method, path, body) of every request on the routes below.
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    adapters: set[str] = field(default_factory=set)
    # Seconds a Responses answer or chat request on an adapter takes, to keep requests in flight.
    hold: float = 0.0

    def app(self) -> Starlette:
        app = super().app()
        app.router.routes[1:1] = [
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/responses", self.create, methods=["POST"]),
            Route("/v1/responses/{rid}", self.retrieve, methods=["GET"]),
            Route("/v1/responses/{rid}/cancel", self.cancel, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/v1/load_lora_adapter", self.load, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload, methods=["POST"]),
        ]
        return app

    async def _record(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        body: dict[str, Any] = json.loads(raw) if raw else {}
        self.calls.append((request.method, request.url.path, body))
        self.headers.append(dict(request.headers))
        return body

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.calls]

    async def embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        items = body["input"] if isinstance(body["input"], list) and isinstance(body["input"][0], str) else [0]
        data = [{"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2]} for i in range(len(items))]
        return JSONResponse({"object": "list", "model": body["model"], "data": data, "usage": USAGE})

    def _response(self, body: dict[str, Any], status: str) -> dict[str, Any]:
        text = {"type": "output_text", "text": "Paris", "annotations": []}
        return {
            "id": body["request_id"],
            "object": "response",
            "model": body["model"],
            "status": status,
            "output": [{"type": "message", "role": "assistant", "content": [text]}],
            "usage": {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12},
        }

    async def create(self, request: Request) -> Response:
        body = await self._record(request)
        answer = self._response(body, "completed")
        if body.get("store", True):
            self.stored[body["request_id"]] = answer
        if not body.get("stream"):
            await asyncio.sleep(self.hold)
            return JSONResponse(answer)
        return StreamingResponse(self.events(answer), media_type="text/event-stream")

    async def events(self, answer: dict[str, Any]) -> AsyncIterator[bytes]:
        def event(kind: str, data: dict[str, Any]) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

        yield event("response.created", {"response": {**answer, "status": "in_progress", "usage": None}})
        for piece in ("Pa", "ris"):
            await asyncio.sleep(self.hold)
            yield event("response.output_text.delta", {"delta": piece, "item_id": "m", "output_index": 0})
        yield event("response.completed", {"response": answer})

    async def retrieve(self, request: Request) -> Response:
        await self._record(request)
        found = self.stored.get(request.path_params["rid"])
        if found is None:
            return JSONResponse({"error": {"message": "not found", "type": "NotFoundError", "code": 404}}, 404)
        return JSONResponse(found)

    async def cancel(self, request: Request) -> Response:
        await self._record(request)
        found = self.stored.get(request.path_params["rid"])
        if found is None:
            return JSONResponse({"error": {"message": "not found", "type": "NotFoundError", "code": 404}}, 404)
        return JSONResponse({**found, "status": "cancelled"})

    async def tokenize(self, request: Request) -> Response:
        body = await self._record(request)
        tokens = [len(word) for word in str(body.get("prompt", "")).split()]
        return JSONResponse({"count": len(tokens), "max_model_len": 2048, "tokens": tokens})

    async def detokenize(self, request: Request) -> Response:
        body = await self._record(request)
        return JSONResponse({"prompt": " ".join("x" * t for t in body["tokens"])})

    async def load(self, request: Request) -> Response:
        body = await self._record(request)
        if body["lora_name"] in self.adapters:
            message = f"The lora adapter '{body['lora_name']}' has already been loaded."
            return JSONResponse({"error": {"message": message, "type": "InvalidUserInput", "code": 400}}, 400)
        self.adapters.add(body["lora_name"])
        return Response("Success")

    async def unload(self, request: Request) -> Response:
        body = await self._record(request)
        self.adapters.discard(body["lora_name"])
        return Response("Success")

    async def generate(self, request: Request) -> Response:
        body = json.loads(await request.body())
        if body.get("model") in self.adapters:
            await asyncio.sleep(self.hold)
        return await super().generate(_Replay(request, body))


class _Replay(Request):
    """The same request with its body already read (the parent engine reads it again)."""

    def __init__(self, request: Request, body: dict[str, Any]) -> None:
        super().__init__(request.scope, request.receive)
        self._json = body
        self._body = json.dumps(body).encode()
