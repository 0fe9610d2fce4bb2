"""An OpenAI-style upstream that answers at once: isolates the gateway's own cost in overhead benchmarks."""

from __future__ import annotations

import argparse
import json

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

TOKENS = 16


def event(data: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def health(_: Request) -> Response:
    return Response(status_code=200)


async def chat(request: Request) -> Response:
    body = await request.json()
    usage = {"prompt_tokens": 8, "completion_tokens": TOKENS, "total_tokens": 8 + TOKENS}
    if not body.get("stream"):
        message = {"role": "assistant", "content": "tok " * TOKENS}
        return JSONResponse(
            {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message}], "usage": usage}
        )
    base = {"id": "x", "object": "chat.completion.chunk", "model": body["model"]}
    chunks = [event({**base, "choices": [{"index": 0, "delta": {"content": "tok "}}]}) for _ in range(TOKENS)]
    chunks.append(event({**base, "choices": [], "usage": usage}))
    chunks.append(b"data: [DONE]\n\n")
    return StreamingResponse(iter(chunks), media_type="text/event-stream")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = Starlette(routes=[Route("/health", health), Route("/v1/chat/completions", chat, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
