"""The baseline: an OpenAI-style server that runs Hugging Face transformers `generate`, one request at a time.

This is the server a team writes before it adopts an inference engine (no batching, no paged KV cache); the load
tests measure the stack against it on the same model and the same requests.

    python -m loadtests.baselines.hf_server --model ~/.cache/llmserve/models/smollm2-135m-instruct --port 8200
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serve.protocol.stream import DONE, encode

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Generator:
    """One model in memory; `run` generates for one request and calls `on_text` with each new piece of text."""

    def __init__(self, model_path: str, dtype: str = "float32", threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model.eval()

    def encode(self, body: dict[str, Any]) -> list[int]:
        if "messages" in body:
            text = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string")
        return list(self.tokenizer(prompt).input_ids)

    def run(
        self, ids: list[int], body: dict[str, Any], on_text: Callable[[str], None], stop: threading.Event
    ) -> Outcome:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        torch, tokenizer = self.torch, self.tokenizer
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        temperature = float(body.get("temperature", 1.0))
        generated: list[int] = []
        emitted = ""

        class Streamer(BaseStreamer):  # type: ignore[misc]
            prompt_seen = False

            def put(self, value: Any) -> None:
                nonlocal emitted
                if not self.prompt_seen:  # generate() first pushes the prompt itself
                    self.prompt_seen = True
                    return
                generated.extend(int(t) for t in value.reshape(-1).tolist())
                # Decode everything so far and send the new suffix; an incomplete UTF-8 sequence waits.
                text = tokenizer.decode(generated, skip_special_tokens=True)
                if len(text) > len(emitted) and not text.endswith("\ufffd"):
                    on_text(text[len(emitted) :])
                    emitted = text

            def end(self) -> None:
                return None

        class Cancelled(StoppingCriteria):  # type: ignore[misc]
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        options: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "do_sample": temperature > 0,
            "streamer": Streamer(),
            "stopping_criteria": StoppingCriteriaList([Cancelled()]),
            "pad_token_id": tokenizer.eos_token_id,
        }
        if temperature > 0:
            options["temperature"] = temperature
            options["top_p"] = float(body.get("top_p", 1.0))
        if body.get("ignore_eos"):
            options["min_new_tokens"] = max_tokens
        with torch.inference_mode():
            self.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **options
            )
        reason = "length" if len(generated) >= max_tokens else "stop"
        return Outcome(len(ids), len(generated), reason)


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


def create_app(generator: Generator, served_name: str, api_key: str | None = None) -> Starlette:
    # The whole point of this server: requests wait for each other. One lock, one generation at a time.
    lock = asyncio.Lock()

    async def generate(request: Request, emit: Callable[[str], None], stop: threading.Event) -> Outcome:
        body = request.state.body
        ids = request.state.ids
        loop = asyncio.get_running_loop()
        result: list[Outcome | BaseException] = []
        finished = asyncio.Event()

        def work() -> None:
            try:
                result.append(generator.run(ids, body, lambda text: loop.call_soon_threadsafe(emit, text), stop))
            except BaseException as exc:  # reported to the waiting request below
                result.append(exc)
            finally:
                loop.call_soon_threadsafe(finished.set)

        threading.Thread(target=work, daemon=True).start()
        try:
            await finished.wait()
        finally:
            # A client that went away stops generation; the lock is released only once the model is free.
            stop.set()
            await finished.wait()
        outcome = result[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def completions(request: Request) -> Response:
        if api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(401, "invalid API key", "authentication_error")
        try:
            body = await request.json()
            request.state.body = body
            request.state.ids = await asyncio.to_thread(generator.encode, body)
        except (ValueError, KeyError, TypeError) as exc:
            return error(400, f"bad request: {exc}")
        chat = request.url.path.endswith("/chat/completions")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:16]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage(o: Outcome) -> dict[str, int]:
            return {
                "prompt_tokens": o.prompt_tokens,
                "completion_tokens": o.completion_tokens,
                "total_tokens": o.prompt_tokens + o.completion_tokens,
            }

        if not body.get("stream"):
            pieces: list[str] = []
            async with lock:
                if await request.is_disconnected():
                    return Response(status_code=499)
                outcome = await generate(request, pieces.append, threading.Event())
            text = "".join(pieces)
            choice: dict[str, Any] = {"index": 0, "finish_reason": outcome.finish_reason}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return JSONResponse(
                {"id": rid, "object": obj, "created": created, "model": served_name, "choices": [choice]}
                | {"usage": usage(outcome)}
            )

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            data = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": served_name}
            return encode({**data, "choices": choices, **extra})

        def piece(text: str, finish: str | None = None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        async def stream() -> AsyncIterator[bytes]:
            queue: asyncio.Queue[str | Outcome | BaseException] = asyncio.Queue()
            stop = threading.Event()

            async def produce() -> None:
                try:
                    queue.put_nowait(await generate(request, queue.put_nowait, stop))
                except BaseException as exc:
                    queue.put_nowait(exc)

            async with lock:
                if await request.is_disconnected():
                    return  # the client gave up while waiting in line
                if chat:
                    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                task = asyncio.create_task(produce())
                try:
                    while True:
                        item = await queue.get()
                        if isinstance(item, str):
                            yield event([piece(item)])
                        elif isinstance(item, Outcome):
                            yield event([piece("", item.finish_reason)])
                            if include_usage:
                                yield event([], usage=usage(item))
                            yield DONE
                            break
                        else:
                            yield encode({"error": {"message": str(item), "type": "server_error"}})
                            break
                finally:
                    stop.set()
                    await task

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def health(_: Request) -> Response:
        return Response(status_code=200)

    async def models(_: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "baseline"}]}
        )

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder (or hub id)")
    p.add_argument("--served-model-name")
    p.add_argument("--dtype", default="float32", help="use the engine's dtype for a fair comparison")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8200)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    generator = Generator(args.model, args.dtype, args.threads)
    name = args.served_model_name or Path(args.model).name
    app = create_app(generator, name, os.environ.get("BASELINE_API_KEY") or None)
    log.info("baseline serving %s as %s on %s:%s", args.model, name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
