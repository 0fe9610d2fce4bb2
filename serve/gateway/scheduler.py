"""The gateway's queue per model: who gets an engine when the engines are full, and how long the rest may wait.

Saturation comes from real signals: a target of requests in flight per engine (the engine's max_num_seqs unless the
model file says otherwise), and the engine's own load, read at every health check: an engine that queues because it is
full (requests waiting with its batch full or its KV cache nearly so, as when other gateways send to it too) gets no
more until it does not. A request that waits for the next engine step is not such a queue. Under the target a request
takes its lease at once (no queue, no await). Over it, the request waits here: priority classes in strict order (a batch
request waiting longer than `max_starvation` is served as standard), and within a class the key with the fewest tokens
served, weighted (a virtual token counter, as in Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024).
A key that comes back from idle starts at the lowest counter of the active keys, so idleness is no credit.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from serve.config.keys import KeyRecord
from serve.config.model_file import Scheduling
from serve.gateway.errors import RateLimited, Unavailable
from serve.gateway.pool import Endpoint, EndpointPool, Lease

CLASSES = ("interactive", "standard", "batch")
# vLLM's default max_num_seqs: the target when the model file sets neither it nor max_running_per_engine.
VLLM_DEFAULT_MAX_NUM_SEQS = 256
# Above this share of its KV cache in use, an engine with requests waiting is taken to be full.
KV_FULL = 0.9


@dataclass(eq=False, slots=True)
class Waiter:
    key: KeyRecord
    klass: str
    arrival: float
    affinity: str | None
    cost: float
    future: asyncio.Future[Lease]


@dataclass(slots=True)
class KeyShare:
    """A key's place in the fair share: its virtual token counter and how many requests it has here."""

    counter: float = 0.0
    active: int = 0
    queues: dict[str, collections.deque[Waiter]] = field(default_factory=dict)


class Scheduler:
    def __init__(self, pool: EndpointPool, settings: Scheduling, max_num_seqs: int | None) -> None:
        self.pool = pool
        self.settings = settings
        self.target = settings.max_running_per_engine or max_num_seqs or VLLM_DEFAULT_MAX_NUM_SEQS
        # The engine's batch: running this many, it queues whatever else comes.
        self.engine_batch = max_num_seqs or VLLM_DEFAULT_MAX_NUM_SEQS
        # At least one place stays open to the other classes.
        self.reserve = min(settings.interactive_reserve, self.target - 1)
        self.shares: dict[str, KeyShare] = {}
        self.waiting = dict.fromkeys(CLASSES, 0)
        self.draining = False
        pool.on_change = self.dispatch

    @property
    def queued(self) -> int:
        return sum(self.waiting.values())

    def room(self, affinity: str | None, klass: str = "interactive") -> Endpoint | None:
        """An endpoint below the class's target whose engine is not queueing (the affinity's own one if it has room).

        Interactive requests may fill an engine to the target; the others leave `interactive_reserve` places free."""
        target = self.target if klass == "interactive" else self.target - self.reserve
        open_ = [ep for ep in self.pool.endpoints if ep.healthy and ep.outstanding < target and not self.full(ep)]
        if not open_:
            return None
        if affinity is not None:
            preferred = self.pool.choose(affinity)
            if preferred is not None and preferred in open_:
                return preferred
        return min(open_, key=lambda ep: ep.outstanding)

    def full(self, ep: Endpoint) -> bool:
        """Whether the engine queued requests because it had no room (at its last health check).

        Requests that arrived between two engine steps wait for the next one: at a few requests a second they are
        nearly always there, and holding work back for them would halve what the engine serves."""
        return ep.waiting > 0 and (ep.running >= self.engine_batch or ep.kv_usage >= KV_FULL)

    async def admit(self, key: KeyRecord, affinity: str | None, cost: float) -> Lease:
        """A lease on an engine: at once when one has room and nobody waits, else after waiting our turn.

        `cost` is what the key's counter is charged at admission (its prompt tokens); `finished` charges the
        output. 429 when the queue is full or the wait too long; 503 when the gateway drains meanwhile.
        """
        if self.draining:
            raise Unavailable("the gateway is shutting down", code="draining", headers={"retry-after": "1"})
        share = self.shares.get(key.id)
        if share is None:
            share = self.shares[key.id] = KeyShare()
        if share.active == 0:
            # Back from idle: no credit for the time away (the lowest counter among the keys still here).
            others = [s.counter for s in self.shares.values() if s.active]
            if others:
                share.counter = max(share.counter, min(others))
        # Nobody waits ahead of this request: nothing queued, or (interactive) nothing of its class, which goes first.
        if not self.queued or (key.priority == "interactive" and not self.waiting["interactive"]):
            endpoint = self.room(affinity, key.priority)
            if endpoint is not None:
                return self._grant(share, key, endpoint, affinity, cost)
        if not self.pool.ready:
            raise Unavailable(f"no healthy engine for model {self.pool.model!r}", headers={"retry-after": "1"})
        if self.queued >= self.settings.max_queue:
            raise RateLimited(
                f"model {self.pool.model!r} has {self.queued} requests waiting, its limit: try again shortly",
                code="queue_full",
                headers={"retry-after": "1"},
            )
        loop = asyncio.get_running_loop()
        waiter = Waiter(key, key.priority, time.monotonic(), affinity, cost, loop.create_future())
        share.queues.setdefault(key.priority, collections.deque()).append(waiter)
        share.active += 1
        self.waiting[key.priority] += 1
        try:
            async with asyncio.timeout(self.settings.max_queue_wait):
                return await waiter.future
        except BaseException as exc:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Granted as we were leaving: give the place straight back.
                future.result().__exit__(None, None, None)
                share.active -= 1
            else:
                self._forget(share, waiter)
            if isinstance(exc, TimeoutError):
                wait = self.settings.max_queue_wait
                raise RateLimited(
                    f"waited {wait:.0f} s for an engine of model {self.pool.model!r}: try again shortly",
                    code="queue_timeout",
                    headers={"retry-after": "1"},
                ) from None
            raise

    def _forget(self, share: KeyShare, waiter: Waiter) -> None:
        queue = share.queues.get(waiter.klass)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.waiting[waiter.klass] -= 1
            share.active -= 1

    def _grant(self, share: KeyShare, key: KeyRecord, endpoint: Endpoint, affinity: str | None, cost: float) -> Lease:
        share.counter += cost / key.weight
        share.active += 1
        return Lease(self.pool, endpoint, affinity)

    def finished(self, key: KeyRecord, output_tokens: int) -> None:
        """A request admitted for this key ended: charge its output and let its place go."""
        share = self.shares.get(key.id)
        if share is None:
            return
        share.counter += self.settings.output_token_weight * max(0, output_tokens) / key.weight
        share.active = max(0, share.active - 1)

    def _eligible(self, klass: str, now: float) -> Iterator[tuple[KeyShare, collections.deque[Waiter]]]:
        for share in self.shares.values():
            queue = share.queues.get(klass)
            if queue:
                yield share, queue
            if klass == "standard":
                # Batch work waiting past the starvation bound competes as standard.
                aged = share.queues.get("batch")
                if aged and now - aged[0].arrival >= self.settings.max_starvation:
                    yield share, aged

    def next_waiter(self) -> tuple[KeyShare, Waiter] | None:
        now = time.monotonic()
        for klass in CLASSES:
            best: tuple[float, float, KeyShare, collections.deque[Waiter]] | None = None
            for share, queue in self._eligible(klass, now):
                rank = (share.counter, queue[0].arrival)
                if best is None or rank < best[:2]:
                    best = (*rank, share, queue)
            if best is not None:
                share, queue = best[2], best[3]
                waiter = queue.popleft()
                self.waiting[waiter.klass] -= 1
                return share, waiter
        return None

    def dispatch(self) -> None:
        """Hand free places to waiters, best first (called whenever a lease ends, and after each health check)."""
        if self.draining:
            self.refuse_all()
            return
        while self.queued:
            if self.room(None) is None:
                return
            picked = self.next_waiter()
            if picked is None:
                return
            share, waiter = picked
            if waiter.future.done():  # its request is leaving; it forgets itself
                continue
            endpoint = self.room(waiter.affinity, waiter.klass)
            if endpoint is None:
                # The free places are the interactive reserve: the best waiter is not interactive, so none goes.
                share.queues[waiter.klass].appendleft(waiter)
                self.waiting[waiter.klass] += 1
                return
            share.counter += waiter.cost / waiter.key.weight
            waiter.future.set_result(Lease(self.pool, endpoint, waiter.affinity))

    def refuse_all(self) -> None:
        """Drain: every queued request is answered 503 at once; requests in flight finish."""
        self.draining = True
        for share in self.shares.values():
            for klass, queue in share.queues.items():
                while queue:
                    waiter = queue.popleft()
                    self.waiting[klass] -= 1
                    share.active -= 1
                    if not waiter.future.done():
                        waiter.future.set_exception(
                            Unavailable("the gateway is shutting down", code="draining", headers={"retry-after": "1"})
                        )

    def depth(self) -> dict[str, int]:
        return dict(self.waiting)
