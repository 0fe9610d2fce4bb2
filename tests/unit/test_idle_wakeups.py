"""An idle gateway's loop sleeps: the drain watch and the client watch wake only when there is something to do."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from serve.gateway import context as context_module
from serve.gateway import drain as drain_module
from serve.gateway.context import WATCH_AFTER, ClientWatch, RequestContext
from serve.gateway.drain import Drain

REAL_SLEEP = asyncio.sleep


def counting_sleeps(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[float]:
    """Every asyncio.sleep the module's code awaits, by its length (the test's own sleeps use REAL_SLEEP)."""
    calls: list[float] = []

    async def sleep(delay: float, result: Any = None) -> Any:
        calls.append(delay)
        return await REAL_SLEEP(delay, result)

    monkeypatch.setattr(module.asyncio, "sleep", sleep)
    return calls


def test_the_drain_watch_sleeps_until_the_drain_begins_from_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = counting_sleeps(monkeypatch, drain_module)
    drain = Drain(timeout=5)
    begun, done = [], []
    drain.on_begin = lambda: begun.append(time.monotonic())
    drain.on_done = lambda: done.append(time.monotonic())

    async def scenario() -> float:
        watch = asyncio.create_task(drain.watch())
        await REAL_SLEEP(0.3)
        assert not sleeps and not begun, f"the watch woke {len(sleeps)} times before any drain"
        # As a signal handler or the workers' supervisor thread would.
        at = time.monotonic()
        threading.Thread(target=drain.begin).start()
        await asyncio.wait_for(watch, 5)
        return at

    at = asyncio.run(scenario())
    assert begun and done, "the drain never began or never ended"
    assert begun[0] - at < 1.0


def test_a_drain_begun_before_the_watch_starts_is_not_missed() -> None:
    drain = Drain(timeout=5)
    done: list[bool] = []
    drain.on_done = lambda: done.append(True)
    drain.begin()
    asyncio.run(asyncio.wait_for(drain.watch(), 5))
    assert done


def test_the_client_watch_sleeps_while_no_request_is_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = counting_sleeps(monkeypatch, context_module)

    async def scenario() -> tuple[int, bool]:
        watch = ClientWatch()
        runner = asyncio.create_task(watch.run())
        await REAL_SLEEP(0.3)
        idle_sleeps = len(sleeps)
        # A request that is still running past WATCH_AFTER gets its watcher: the watch woke for it.
        ctx = RequestContext(id="r1", start=time.perf_counter(), route="/v1/chat/completions")
        never = asyncio.Event()

        async def request() -> None:
            watch.add(ctx, never.wait)
            await REAL_SLEEP(10)

        task = asyncio.create_task(request())
        await REAL_SLEEP(WATCH_AFTER * 4)
        watched = ctx in watch._watchers
        watch.discard(ctx)
        task.cancel()
        runner.cancel()
        await asyncio.gather(task, runner, return_exceptions=True)
        return idle_sleeps, watched

    idle_sleeps, watched = asyncio.run(scenario())
    assert idle_sleeps == 0, f"the client watch woke {idle_sleeps} times with no request pending"
    assert watched, "a request pending past WATCH_AFTER was not watched"
