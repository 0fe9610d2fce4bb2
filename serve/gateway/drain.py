"""Graceful drain: on SIGTERM refuse new work, let requests in flight finish until a deadline, then exit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _nothing() -> int:
    return 0


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

    def begin(self) -> None:
        """Safe to call from a signal handler: it only flips a flag that `watch` polls."""
        self.active = True

    async def watch(self, poll: float = 0.05) -> None:
        # Polled rather than an asyncio.Event: `begin` runs inside a signal handler, where touching the loop is unsafe.
        while not self.active:  # noqa: ASYNC110
            await asyncio.sleep(poll)
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
