"""Graceful drain: on SIGTERM refuse new work, let requests in flight finish until a deadline, then exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _nothing() -> int:
    return 0


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Drain:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.active = False
        # Requests in flight, read from the endpoint leases (the app sets it at startup; nobody counts twice).
        self.inflight: Callable[[], int] = _nothing
        # Set by the server: called once the drain is over (nothing in flight, or the deadline passed).
        self.on_done: Callable[[], None] | None = None
        # Set by the app: called when the drain begins, on the loop (it refuses what waits in the queues).
        self.on_begin: Callable[[], object] | None = None
        # Set while `watch` waits for the drain to begin: wakes it.
        self._wake: Callable[[], None] | None = None

    def begin(self) -> None:
        """Safe from a signal handler or another thread: it flips a flag and wakes `watch` through the loop's
        thread-safe call."""
        self.active = True
        wake = self._wake
        if wake is not None:
            wake()

    async def watch(self, poll: float = 0.05) -> None:
        # Asleep until the drain begins: an idle gateway wakes for nothing. `begin` sets the flag before it looks for
        # the hook and the hook is set before the flag is looked at again, so one of the two always sees the other.
        if not self.active:
            loop = asyncio.get_running_loop()
            begun: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is left to drain
                    loop.call_soon_threadsafe(_settle, begun)

            self._wake = wake
            try:
                if not self.active:
                    await begun
            finally:
                self._wake = None
        if self.on_begin is not None:
            # Queued requests are answered 503 at once; only those in flight finish.
            self.on_begin()
        log.info("draining: %d requests in flight, up to %.0fs to finish", self.inflight(), self.timeout)
        deadline = time.monotonic() + self.timeout
        while self.inflight() > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(poll)
        if left := self.inflight():
            log.warning("drain deadline passed with %d requests in flight: closing them", left)
        else:
            log.info("drained: nothing in flight")
        if self.on_done is not None:
            self.on_done()
