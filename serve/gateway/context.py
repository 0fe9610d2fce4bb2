"""The request context: made once per request by the gateway's entry, closed in exactly one place.

Whatever a request takes (its endpoint lease, its limiter ticket, the engine response, the watch on the client) is
entered into `resources` at the moment it is taken. The entry closes that stack once, however the request ends
(answer, error, timeout, client gone before or after the first byte, drain), then records metrics and the access
log from what the context says happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from serve.config.keys import KeyRecord

CONTEXT = "llmserve.context"

T = TypeVar("T")
# Seconds into a request before its client is watched for leaving (see RequestContext.watch_client).
WATCH_AFTER = 0.05
log = logging.getLogger(__name__)


class Resources:
    """What one request holds, released last-taken first by `aclose`, each release whatever the others do.

    The part of contextlib.AsyncExitStack a request needs, at a fraction of its cost per request: no exception
    is passed into the releases (each one releases, nothing more), and a release that fails is logged and the
    rest still run, so one broken release cannot leak the others.
    """

    __slots__ = ("_releases",)

    def __init__(self) -> None:
        self._releases: list[tuple[Callable[..., Any], tuple[Any, ...], bool]] = []

    def callback(self, fn: Callable[..., Any], *args: Any) -> None:
        self._releases.append((fn, args, False))

    def push_async_callback(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._releases.append((fn, args, True))

    def enter_context(self, cm: contextlib.AbstractContextManager[T]) -> T:
        value = cm.__enter__()
        self._releases.append((cm.__exit__, (None, None, None), False))
        return value

    async def enter_async_context(self, cm: contextlib.AbstractAsyncContextManager[T]) -> T:
        value = await cm.__aenter__()
        self._releases.append((cm.__aexit__, (None, None, None), True))
        return value

    async def aclose(self) -> None:
        releases = self._releases
        cancelled: BaseException | None = None
        while releases:
            fn, args, is_async = releases.pop()
            try:
                if is_async:
                    await fn(*args)
                else:
                    fn(*args)
            except asyncio.CancelledError as exc:
                cancelled = exc  # the rest is still released; the cancellation goes on afterwards
            except Exception:
                log.exception("releasing a request's resource failed")
        if cancelled is not None:
            raise cancelled


@dataclass(slots=True, eq=False)
class RequestContext:
    # The gateway's own id: what the engine sees and every log line carries.
    id: str
    start: float
    route: str
    client: str | None = None
    # A well-formed X-Request-Id the client sent: returned to it and logged beside `id`, never sent to an engine
    # (tenants could collide engine request ids).
    client_request_id: str | None = None
    resources: Resources = field(default_factory=Resources)
    key: KeyRecord | None = None
    # The served model name the request resolved to ("none" until then).
    model: str = "none"
    status: int = 0
    # The engine that took the request; None if no engine ever saw it.
    endpoint: str | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft: float | None = None
    # Events that carried generated output; without the engine's usage, the estimate of completion tokens.
    output_events: int = 0
    prompt_estimate: int = 0
    reserved: int = 0
    # Headers every answer to this request carries, errors included (the limiter's x-ratelimit-*).
    headers: dict[str, str] = field(default_factory=dict)
    # Why the request failed, for the error counter (one reason per request).
    failure: str | None = None
    # Seconds the request waited in the gateway's queue for an engine.
    queue_wait: float | None = None
    # Set just before the last byte is sent; after it a disconnect is the normal end, not the client leaving.
    responded: bool = False
    client_gone: bool = False

    def record_usage(self, usage: dict[str, Any]) -> None:
        prompt, completion = (
            usage.get("prompt_tokens", usage.get("input_tokens")),
            usage.get("completion_tokens", usage.get("output_tokens")),
        )
        self.prompt_tokens = prompt if isinstance(prompt, int) else 0
        self.completion_tokens = completion if isinstance(completion, int) else 0

    @property
    def total_tokens(self) -> int | None:
        """Tokens the request used: the engine's usage, else an estimate; None if no engine ever saw it."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens + (self.completion_tokens or 0)
        if self.output_events:
            return self.prompt_estimate + self.output_events
        if self.endpoint is None:
            return None
        # An engine took it: a stream cut before any token paid for its prompt; a non-streamed answer cut short
        # may have generated everything, so it keeps its whole reservation.
        return self.prompt_estimate if self.stream else self.reserved

    def watch_client(self, receive: Callable[[], Any], watch: ClientWatch) -> None:
        """Have `watch` cancel the request's task if the client disconnects before the answer is complete.

        Called once the body is read (until then `receive` belongs to the body). `client_gone` tells the entry that
        a cancellation means "the client left" (499), not a shutdown. The watch ends with the request.
        """
        watch.add(self, receive)
        self.resources.callback(watch.discard, self)


class ClientWatch:
    """Notices clients that leave before their answer, for every request of a gateway, with one timer in all.

    A request is watched from WATCH_AFTER seconds in: most answers are done by then and never need a watcher task
    (nor a timer of their own); a client that leaves sooner is noticed then.
    """

    def __init__(self) -> None:
        # Requests not watched yet, oldest first (dicts keep insertion order): context -> (task, receive).
        self._pending: dict[RequestContext, tuple[asyncio.Task[Any], Callable[[], Any]]] = {}
        self._watchers: dict[RequestContext, asyncio.Task[None]] = {}
        # Set when a request comes while none was pending: `run` sleeps on it, so an idle gateway is not woken.
        self._arrived = asyncio.Event()

    def add(self, ctx: RequestContext, receive: Callable[[], Any]) -> None:
        task = asyncio.current_task()
        if task is not None:
            if not self._pending:
                self._arrived.set()
            self._pending[ctx] = (task, receive)

    def discard(self, ctx: RequestContext) -> None:
        if self._pending.pop(ctx, None) is None:
            watcher = self._watchers.pop(ctx, None)
            if watcher is not None:
                watcher.cancel()

    async def run(self) -> None:
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            await asyncio.sleep(WATCH_AFTER / 2)
            self.start_due(time.perf_counter() - WATCH_AFTER)

    def start_due(self, started_before: float) -> None:
        while self._pending:
            ctx = next(iter(self._pending))
            if ctx.start > started_before:
                return
            task, receive = self._pending.pop(ctx)
            if not ctx.responded:
                self._watchers[ctx] = asyncio.ensure_future(self._watch(ctx, task, receive))

    async def _watch(self, ctx: RequestContext, task: asyncio.Task[Any], receive: Callable[[], Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # After the last byte a server also answers "disconnect": only a client leaving early counts.
                if not ctx.responded:
                    ctx.client_gone = True
                    task.cancel()
                return


def context_of(scope: dict[str, Any]) -> RequestContext:
    ctx: RequestContext = scope[CONTEXT]
    return ctx
