"""The in-process limiter: each gateway replica counts its keys' limits on its own."""

from __future__ import annotations

import time

from serve.config.keys import KeyRecord
from serve.gateway.limits.base import (
    Clock,
    Limiter,
    Limits,
    Observation,
    Ticket,
    check_size,
    failing,
    new_ticket_id,
    rate_headers,
    refill,
    refusal,
    unused,
)


class _Bucket:
    __slots__ = ("level", "stamp")

    def __init__(self, level: float, stamp: float) -> None:
        self.level = level
        self.stamp = stamp

    def refill(self, now: float, capacity: int) -> float:
        self.level, self.stamp = refill(self.level, self.stamp, now, capacity), max(self.stamp, now)
        return self.level


class _KeyState:
    __slots__ = ("requests", "tokens", "tickets")

    def __init__(self) -> None:
        self.requests: _Bucket | None = None
        self.tokens: _Bucket | None = None
        self.tickets: set[str] = set()

    def bucket(self, name: str, now: float, capacity: int) -> _Bucket:
        current: _Bucket | None = getattr(self, name)
        if current is None:
            current = _Bucket(float(capacity), now)
            setattr(self, name, current)
        current.refill(now, capacity)
        return current


class MemoryLimiter(Limiter):
    """Limits counted in this process: each gateway replica enforces the full limits on its own."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    # No await between reading and taking: on one event loop every acquire and settle is atomic.
    async def acquire(self, key: KeyRecord, reserve_tokens: int) -> Ticket:
        limits = Limits.of(key)
        check_size(limits, reserve_tokens)
        now = self._clock()
        state = self._keys.setdefault(key.id, _KeyState())
        requests = state.bucket("requests", now, limits.rpm) if limits.rpm is not None else None
        tokens = state.bucket("tokens", now, limits.tpm) if limits.tpm is not None else None
        seen = Observation(
            requests=requests.level if requests else None,
            tokens=tokens.level if tokens else None,
            active=len(state.tickets),
        )
        failed = failing(limits, reserve_tokens, seen)
        if failed:
            raise refusal(limits, reserve_tokens, seen, failed)
        if requests is not None:
            requests.level -= 1
        if tokens is not None:
            tokens.level -= reserve_tokens
        ticket = Ticket(
            id=new_ticket_id(),
            key_id=key.id,
            limits=limits,
            reserved_tokens=reserve_tokens,
            headers=rate_headers(limits, requests.level if requests else None, tokens.level if tokens else None),
        )
        state.tickets.add(ticket.id)
        return ticket

    async def settle(self, ticket: Ticket, used_tokens: int | None) -> None:
        state = self._keys.get(ticket.key_id)
        if state is None or ticket.id not in state.tickets:
            return
        state.tickets.discard(ticket.id)
        tpm = ticket.limits.tpm
        if tpm is not None and state.tokens is not None:
            bucket = state.bucket("tokens", self._clock(), tpm)
            bucket.level = min(float(tpm), bucket.level + unused(ticket, used_tokens))

    async def outstanding(self, key_id: str) -> int:
        state = self._keys.get(key_id)
        return len(state.tickets) if state else 0

    async def aclose(self) -> None:
        self._keys.clear()
