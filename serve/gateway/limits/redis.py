"""Per-key limits kept in Redis, so every gateway replica draws on one budget; Lua scripts make each step atomic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from serve.config.gateway import LimitsSettings
from serve.config.keys import KeyRecord
from serve.gateway.errors import Unavailable
from serve.gateway.limits.base import (
    CONCURRENCY,
    REQUESTS,
    TOKENS,
    Clock,
    Limiter,
    Limits,
    Observation,
    Ticket,
    check_size,
    new_ticket_id,
    rate_headers,
    refusal,
    unused,
)

log = logging.getLogger(__name__)

# A pooled connection unused this long is closed (httpx does the same with keep-alive connections). Beyond keeping the
# pool no larger than recent load needs, this is what lets go of the connections a Redis restart broke that no call
# takes any more: the pool hands out the most recently used first, so those left over from a past burst would
# otherwise stay open (CLOSE_WAIT) for ever.
IDLE_EXPIRY_S = 30.0


class IdleExpiringPool(aioredis.ConnectionPool):
    """redis-py's pool, plus `close_idle`: connections released longer ago than `idle_expiry` are taken out and closed.

    The pool already checks each connection it hands out (one the server closed is reconnected first); this only adds
    the connections nobody takes.
    """

    def __init__(self, *args: object, idle_expiry: float, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.idle_expiry = idle_expiry
        self._released_at: weakref.WeakKeyDictionary[aioredis.connection.AbstractConnection, float] = (
            weakref.WeakKeyDictionary()
        )

    async def release(self, connection: aioredis.connection.AbstractConnection) -> None:
        self._released_at[connection] = time.monotonic()
        await super().release(connection)

    async def close_idle(self) -> None:
        """Close the connections idle for longer than `idle_expiry`."""
        cutoff = time.monotonic() - self.idle_expiry
        # Under the pool's own lock, so that none of them is handed out while it is being closed.
        async with self._lock:
            stale = [c for c in self._available_connections if self._released_at.get(c, cutoff) <= cutoff]
            for connection in stale:
                self._available_connections.remove(connection)
        # Shielded: once out of the pool, nothing else would close them if the upkeep were cancelled meanwhile.
        results = await asyncio.shield(asyncio.gather(*(c.disconnect() for c in stale), return_exceptions=True))
        for result in results:
            if isinstance(result, BaseException):
                log.debug("closing an idle Redis connection: %s", result)


# Shared by every script. ARGV[1] is empty: the time is Redis' own (TIME), one clock for every gateway whatever
# theirs say; tests pin it with a number instead. Redis 5 and later replicate a script's effects (the commands it
# ran, with the numbers it computed), not the script, so replicas and AOF replays store these values as they are.
# A bucket is a hash {level, stamp}; a missing one is full. Numbers go back to Python as strings with every digit
# (Redis would truncate a Lua number to an integer, and tostring() rounds).
_BUCKET = """
local now
if ARGV[1] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) + tonumber(time[2]) / 1000000
else
  now = tonumber(ARGV[1])
end

local function fmt(x)
  return string.format('%.17g', x)
end

local stamps = {}

local function level(key, capacity)
  if capacity <= 0 then return 0 end
  local state = redis.call('HMGET', key, 'level', 'stamp')
  local lvl, stamp = tonumber(state[1]), tonumber(state[2])
  if lvl == nil or stamp == nil then return capacity end
  stamps[key] = stamp
  return math.min(capacity, lvl + math.max(0, now - stamp) * capacity / 60)
end

local function store(key, capacity, lvl)
  -- A clock stepping back (Redis failing over to a host whose clock is behind) must not move the stamp back: that
  -- time would be refilled twice.
  redis.call('HSET', key, 'level', fmt(lvl), 'stamp', fmt(math.max(now, stamps[key] or now)))
  -- Once full again the bucket says nothing a missing key would not: let Redis drop it then.
  redis.call('PEXPIRE', key, math.ceil((capacity - lvl) * 60000 / capacity) + 1000)
end

-- Only ever lengthen: replicas configured with different leases must not cut each other's slots short.
local function keep_for(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# KEYS: requests bucket, tokens bucket, slots (sorted set: ticket id -> lease expiry).
# ARGV: pinned time or '', rpm, tpm, max_concurrency (0 = no such limit), reserve, ticket id, lease seconds.
# Returns {admitted, requests level, tokens level, slots in use, requests failed, tokens failed, concurrency failed}.
_ACQUIRE = (
    _BUCKET
    + """
local rpm, tpm, maxc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local reserve, ticket, lease = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
-- Slots whose lease ran out belong to gateways that died without settling.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local active = redis.call('ZCARD', KEYS[3])
local req, tok = level(KEYS[1], rpm), level(KEYS[2], tpm)
local f_req = (rpm > 0 and req < 1) and 1 or 0
local f_tok = (tpm > 0 and tok < reserve) and 1 or 0
local f_conc = (maxc > 0 and active >= maxc) and 1 or 0
if f_req + f_tok + f_conc > 0 then
  return {0, fmt(req), fmt(tok), active, f_req, f_tok, f_conc}
end
if rpm > 0 then
  req = req - 1
  store(KEYS[1], rpm, req)
end
if tpm > 0 then
  tok = tok - reserve
  store(KEYS[2], tpm, tok)
end
redis.call('ZADD', KEYS[3], now + lease, ticket)
keep_for(KEYS[3], math.ceil(lease * 1000) + 1000)
return {1, fmt(req), fmt(tok), active, 0, 0, 0}
"""
)

# KEYS: tokens bucket, slots. ARGV: pinned time or '', tpm (0 = none), ticket id, tokens to give back (negative:
# charge).
# Only the call that removes the ticket gives tokens back, so settling twice (from any replica) counts once.
_SETTLE = (
    _BUCKET
    + """
if redis.call('ZREM', KEYS[2], ARGV[3]) == 0 then return 0 end
local tpm, back = tonumber(ARGV[2]), tonumber(ARGV[4])
if tpm > 0 and back ~= 0 then
  store(KEYS[1], tpm, math.min(tpm, level(KEYS[1], tpm) + back))
end
return 1
"""
)

# KEYS: slots. ARGV: pinned time or '', lease seconds, ticket ids. XX: a slot settled meanwhile is not brought back.
_RENEW = (
    _BUCKET
    + """
local lease = tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
end
keep_for(KEYS[1], math.ceil(lease * 1000) + 1000)
return 0
"""
)

# KEYS: slots. ARGV: pinned time or ''. Slots whose lease ran out are not counted.
_COUNT = (
    _BUCKET
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now), '+inf')
"""
)


class RedisLimiter(Limiter):
    """Limits counted in Redis. Concurrency slots are leases that this process renews while its requests run."""

    def __init__(
        self, client: aioredis.Redis, *, key_prefix: str, slot_lease: float, clock: Clock | None = None
    ) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._lease = slot_lease
        # None: the scripts read Redis' clock. A clock here replaces it, for tests that must not sleep.
        self._clock = clock
        self._acquire = client.register_script(_ACQUIRE)
        self._settle = client.register_script(_SETTLE)
        self._renew = client.register_script(_RENEW)
        self._count = client.register_script(_COUNT)
        self._held: dict[str, Ticket] = {}
        self._upkeep: asyncio.Task[None] | None = None
        # Give-backs of admissions whose caller was cancelled meanwhile; kept so the loop does not drop them.
        self._orphans: set[asyncio.Future[None]] = set()

    @classmethod
    def from_settings(cls, settings: LimitsSettings, clock: Clock | None = None) -> RedisLimiter:
        url = settings.resolved_redis_url()
        if not url:
            raise ValueError("the Redis limits backend needs a URL")
        pool = IdleExpiringPool.from_url(
            url,
            decode_responses=True,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
            # After a Redis restart every pooled connection is dead: a call that meets one reconnects and tries once
            # more (a dead socket took nothing), and one idle for a while is checked before use, so neither a
            # settle (its slot) nor an admission (a 503) is lost to a connection broken long ago.
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
            health_check_interval=5,
            idle_expiry=IDLE_EXPIRY_S,
        )
        client = aioredis.Redis.from_pool(pool)
        return cls(client, key_prefix=settings.key_prefix, slot_lease=settings.slot_lease, clock=clock)

    def _now(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    def _key(self, key_id: str, part: str) -> str:
        # The braces are a Redis Cluster hash tag: a key's three entries share a slot, as a script needs.
        return f"{self._prefix}{{{key_id}}}:{part}"

    async def acquire(self, key: KeyRecord, reserve_tokens: int) -> Ticket:
        limits = Limits.of(key)
        check_size(limits, reserve_tokens)
        ticket_id = new_ticket_id()
        args: list[str | int] = [
            self._now(),
            limits.rpm or 0,
            limits.tpm or 0,
            limits.max_concurrency or 0,
            reserve_tokens,
            ticket_id,
            repr(self._lease),
        ]
        # The upkeep (lease renewal, idle connections) runs from the first call on, whatever its answer.
        if self._upkeep is None or self._upkeep.done():
            self._upkeep = asyncio.create_task(self._upkeep_forever(), name="limits-upkeep")
        keys = [self._key(key.id, "requests"), self._key(key.id, "tokens"), self._key(key.id, "slots")]
        call = asyncio.ensure_future(self._acquire(keys=keys, args=args))
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The script may run anyway: whatever it admitted is given back, not left to the lease.
            call.add_done_callback(
                lambda done: self._release_orphan(done, key.id, limits.tpm, ticket_id, reserve_tokens)
            )
            raise
        except RedisError as exc:
            log.error("limits backend unavailable, refusing the request: %s", exc)
            raise Unavailable(
                "The rate-limit service is unavailable; try again shortly.",
                code="limits_unavailable",
                headers={"retry-after": "1"},
            ) from exc
        admitted, req, tok, active, f_req, f_tok, f_conc = reply
        seen = Observation(
            requests=float(req) if limits.rpm is not None else None,
            tokens=float(tok) if limits.tpm is not None else None,
            active=int(active),
        )
        if not int(admitted):
            failed = [name for name, flag in ((REQUESTS, f_req), (TOKENS, f_tok), (CONCURRENCY, f_conc)) if int(flag)]
            raise refusal(limits, reserve_tokens, seen, failed)
        ticket = Ticket(
            id=ticket_id,
            key_id=key.id,
            limits=limits,
            reserved_tokens=reserve_tokens,
            headers=rate_headers(limits, seen.requests, seen.tokens),
        )
        self._held[ticket_id] = ticket
        return ticket

    async def settle(self, ticket: Ticket, used_tokens: int | None) -> None:
        if self._held.pop(ticket.id, None) is None:
            return
        # Shielded: settle runs in `finally` blocks of requests being cancelled, and must still reach Redis.
        await asyncio.shield(self._give_back(ticket.key_id, ticket.limits.tpm, ticket.id, unused(ticket, used_tokens)))

    async def _give_back(self, key_id: str, tpm: int | None, ticket_id: str, tokens: int) -> None:
        keys = [self._key(key_id, "tokens"), self._key(key_id, "slots")]
        try:
            await self._settle(keys=keys, args=[self._now(), tpm or 0, ticket_id, tokens])
        except RedisError as exc:
            # The slot's lease is no longer renewed, so it frees itself; the tokens refill with time.
            log.warning("could not settle a ticket in the limits backend: %s", exc)

    def _release_orphan(
        self, done: asyncio.Future[list[object]], key_id: str, tpm: int | None, ticket_id: str, reserved: int
    ) -> None:
        if done.cancelled() or done.exception() is not None or not done.result()[0]:
            return
        task = asyncio.ensure_future(self._give_back(key_id, tpm, ticket_id, reserved))
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    async def outstanding(self, key_id: str) -> int:
        count = await self._count(keys=[self._key(key_id, "slots")], args=[self._now()])
        return int(count)

    async def renew(self) -> None:
        """Push the lease of every slot this process holds forward."""
        by_key: dict[str, list[str]] = {}
        for ticket in list(self._held.values()):
            by_key.setdefault(ticket.key_id, []).append(ticket.id)
        now = self._now()
        for key_id, ids in by_key.items():
            await self._renew(keys=[self._key(key_id, "slots")], args=[now, repr(self._lease), *ids])

    async def _upkeep_forever(self) -> None:
        # Every third of the lease, so that two renewals may fail before a live request loses its slot; and every
        # third of the pool's idle expiry, so that an idle connection is closed at most a third of it late (with the
        # default 60 s lease and 30 s expiry: every 10 s, renewals included).
        pool = self._redis.connection_pool
        expiring = pool if isinstance(pool, IdleExpiringPool) else None
        period = min(self._lease, expiring.idle_expiry if expiring else self._lease) / 3
        while True:
            await asyncio.sleep(period)
            try:
                await self.renew()
            except RedisError as exc:
                log.warning("could not renew concurrency slots in the limits backend: %s", exc)
            if expiring is not None:
                await expiring.close_idle()

    async def aclose(self) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
            self._upkeep = None
        self._held.clear()
        if self._orphans:
            await asyncio.gather(*self._orphans, return_exceptions=True)
        await self._redis.aclose()
