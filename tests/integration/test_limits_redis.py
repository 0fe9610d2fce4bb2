"""The Redis limiter against a real redis-server on loopback: the shared contract, replicas, leases, outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import psutil
import pytest
import redis
import redis.asyncio as aioredis

from serve.config.gateway import LimitsSettings
from serve.config.keys import KeyRecord
from serve.gateway.errors import Unavailable
from serve.gateway.limits import RedisLimiter, create_limiter
from serve.gateway.limits import redis as redis_limits
from serve.gateway.limits.base import CONCURRENCY, REQUESTS, TOKENS, Limiter, Ticket
from tests.limits_contract import FakeClock, LimiterContract, make_key, refused
from tests.servers import free_port
from tests.soak.redis_server import RedisServer

pytestmark = pytest.mark.anyio

# Longer than any fake-clock jump in the contract, so that its slots only end by settle.
CONTRACT_LEASE = 600.0


@contextmanager
def redis_server(*extra: str) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, without persistence; yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        reason = "redis-server is not installed (Debian: apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the Redis limiter tests")
        pytest.skip(reason)
    port = free_port()
    # Its own folder: a replica's full sync writes an RDB file there even without persistence.
    folder = tempfile.mkdtemp(prefix="redis-")
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", folder]
    proc = subprocess.Popen([*argv, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    stderr = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"redis-server did not start on port {port}: {stderr}")
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def make_limiter(url: str, prefix: str, clock: FakeClock, lease: float = CONTRACT_LEASE) -> RedisLimiter:
    return RedisLimiter(aioredis.from_url(url, decode_responses=True), key_prefix=prefix, slot_lease=lease, clock=clock)


@pytest.fixture
async def limiter(redis_url: str, prefix: str, clock: FakeClock) -> AsyncIterator[RedisLimiter]:
    limiter = make_limiter(redis_url, prefix, clock)
    yield limiter
    await limiter.aclose()


class TestRedisLimiter(LimiterContract):
    pass


async def test_two_replicas_share_one_budget(redis_url: str, prefix: str, clock: FakeClock) -> None:
    a, b = make_limiter(redis_url, prefix, clock), make_limiter(redis_url, prefix, clock)
    try:
        key = make_key(rpm=4, tpm=600, max_concurrency=3)
        t1 = await a.acquire(key, 100)
        t2 = await b.acquire(key, 100)
        assert t2.headers["x-ratelimit-remaining-requests"] == "2"
        assert t2.headers["x-ratelimit-remaining-tokens"] == "400"
        t3 = await a.acquire(key, 100)
        assert await a.outstanding(key.id) == await b.outstanding(key.id) == 3
        assert (await refused(b, key, 100)).code == CONCURRENCY

        await a.settle(t1, 50)  # 50 back, and a slot free for either replica
        t4 = await b.acquire(key, 300)
        assert t4.headers["x-ratelimit-remaining-requests"] == "0"
        assert t4.headers["x-ratelimit-remaining-tokens"] == "50"
        await b.settle(t2, None)
        assert (await refused(a, key, 10)).code == REQUESTS
        assert (await refused(a, key, 10)).headers["x-ratelimit-remaining-tokens"] == "150"

        clock.advance(15)  # one request and 150 tokens back, seen by both
        assert (await refused(b, key, 301)).code == TOKENS
        t5 = await b.acquire(key, 300)
        for limiter, ticket in ((a, t3), (b, t4), (b, t5)):
            await limiter.settle(ticket, 0)
        assert await a.outstanding(key.id) == 0
    finally:
        await a.aclose()
        await b.aclose()


async def test_slots_of_a_replica_that_died_expire_with_their_lease(
    redis_url: str, prefix: str, clock: FakeClock
) -> None:
    key = make_key(max_concurrency=1)
    dead, alive = make_limiter(redis_url, prefix, clock, lease=10), make_limiter(redis_url, prefix, clock, lease=10)
    try:
        await dead.acquire(key, 0)
        await dead.aclose()  # gone without settling, like a killed process
        clock.advance(9.9)
        assert (await refused(alive, key)).code == CONCURRENCY
        clock.advance(0.2)
        await alive.settle(await alive.acquire(key, 0), 0)
    finally:
        await alive.aclose()


async def test_a_live_replica_renews_its_slots(redis_url: str, prefix: str, clock: FakeClock) -> None:
    key = make_key(max_concurrency=1)
    a, b = make_limiter(redis_url, prefix, clock, lease=10), make_limiter(redis_url, prefix, clock, lease=10)
    try:
        held = await a.acquire(key, 0)
        for _ in range(3):
            clock.advance(8)
            await a.renew()
        assert (await refused(b, key)).code == CONCURRENCY  # 24 s after a 10 s lease, still held
        await a.settle(held, 0)
        await a.renew()  # a settled slot is not brought back
        assert await b.outstanding(key.id) == 0
        await b.settle(await b.acquire(key, 0), 0)
    finally:
        await a.aclose()
        await b.aclose()


async def test_renewal_runs_by_itself(redis_url: str, prefix: str, raw: aioredis.Redis) -> None:
    # Real time here: a 3 s lease is renewed every second by the background task.
    limiter = RedisLimiter(aioredis.from_url(redis_url, decode_responses=True), key_prefix=prefix, slot_lease=3)
    try:
        key = make_key(max_concurrency=1)
        ticket = await limiter.acquire(key, 0)
        slots = f"{prefix}{{{key.id}}}:slots"
        first = float(await raw.zscore(slots, ticket.id) or 0)
        await asyncio.sleep(1.5)
        assert float(await raw.zscore(slots, ticket.id) or 0) > first
        await limiter.settle(ticket, 0)
        assert await raw.zscore(slots, ticket.id) is None
    finally:
        await limiter.aclose()


async def test_every_entry_expires(limiter: RedisLimiter, prefix: str, raw: aioredis.Redis) -> None:
    key = make_key(rpm=60, tpm=600, max_concurrency=5)
    tickets = [await limiter.acquire(key, 100) for _ in range(3)]
    await limiter.settle(tickets[0], 10)
    names = sorted([name async for name in raw.scan_iter(match=f"{prefix}*")])
    assert names == [f"{prefix}{{{key.id}}}:{part}" for part in ("requests", "slots", "tokens")]
    ttls = {name.rsplit(":", 1)[1]: await raw.pttl(name) for name in names}
    # requests: 3 of 60 taken -> full in 3 s; tokens: 210 short -> 21 s; slots: the lease; each plus 1 s.
    assert 3000 < ttls["requests"] <= 4000
    assert 21000 < ttls["tokens"] <= 22000
    assert CONTRACT_LEASE * 1000 < ttls["slots"] <= CONTRACT_LEASE * 1000 + 1000


async def test_a_shorter_lease_does_not_cut_another_replicas_slots(
    redis_url: str, prefix: str, clock: FakeClock, raw: aioredis.Redis
) -> None:
    key = make_key(max_concurrency=5)
    long, short = make_limiter(redis_url, prefix, clock, lease=600), make_limiter(redis_url, prefix, clock, lease=10)
    try:
        await long.acquire(key, 0)
        await short.acquire(key, 0)
        assert await raw.pttl(f"{prefix}{{{key.id}}}:slots") > 500_000
        clock.advance(11)
        assert await short.outstanding(key.id) == 1
    finally:
        await long.aclose()
        await short.aclose()


async def test_a_cancelled_admission_gives_back_what_it_took(
    limiter: RedisLimiter, prefix: str, raw: aioredis.Redis
) -> None:
    key = make_key(tpm=600, max_concurrency=1)
    task = asyncio.create_task(limiter.acquire(key, 600))
    await asyncio.sleep(0)  # the script is on its way to Redis
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The script still runs (the tokens bucket appears), then the give-back frees the slot; up to 5 s.
    tokens = f"{prefix}{{{key.id}}}:tokens"
    for _ in range(500):
        if await raw.exists(tokens) and not await limiter.outstanding(key.id):
            break
        await asyncio.sleep(0.01)
    ticket = await limiter.acquire(key, 600)
    assert ticket.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_a_stalled_replica_does_not_get_an_expired_slot_back(
    redis_url: str, prefix: str, clock: FakeClock
) -> None:
    key = make_key(tpm=600, max_concurrency=1)
    stalled, other = make_limiter(redis_url, prefix, clock, lease=10), make_limiter(redis_url, prefix, clock, lease=10)
    try:
        late = await stalled.acquire(key, 600)
        clock.advance(11)  # the lease ran out before the stalled replica renewed it; 110 tokens back
        taken = await other.acquire(key, 100)
        await stalled.renew()
        assert await other.outstanding(key.id) == 1
        await stalled.settle(late, 0)  # its slot was taken back already: nothing is given back twice
        err = await refused(other, key, 0)
        assert err.code == CONCURRENCY
        assert err.headers["x-ratelimit-remaining-tokens"] == "10"
        await other.settle(taken, 100)
    finally:
        await stalled.aclose()
        await other.aclose()


async def test_an_unreachable_redis_refuses_with_503() -> None:
    settings = LimitsSettings(backend="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout=0.5)
    limiter = create_limiter(settings)
    assert isinstance(limiter, RedisLimiter)
    try:
        with pytest.raises(Unavailable) as caught:
            await limiter.acquire(make_key(rpm=5), 0)
        assert caught.value.status == 503
        assert caught.value.code == "limits_unavailable"
        assert caught.value.headers == {"retry-after": "1"}
    finally:
        await limiter.aclose()


async def test_settle_survives_redis_going_away(
    prefix: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_server() as url:
        limiter = make_limiter(url, prefix, clock)
        ticket = await limiter.acquire(make_key(max_concurrency=1), 0)
    try:
        with caplog.at_level(logging.WARNING, logger="serve.gateway.limits.redis"):
            await limiter.settle(ticket, 0)  # logged, not raised: the request is over either way
        assert "could not settle a ticket" in caplog.text
        caplog.clear()
        await limiter.settle(ticket, 0)  # and not tried again
        assert caplog.text == ""
    finally:
        await limiter.aclose()


async def test_factory_builds_a_working_redis_limiter(redis_url: str, prefix: str) -> None:
    limiter = create_limiter(LimitsSettings(backend="redis", redis_url=redis_url, key_prefix=prefix))
    try:
        key = make_key(rpm=2)
        ticket = await limiter.acquire(key, 0)
        assert ticket.headers["x-ratelimit-remaining-requests"] == "1"
        await limiter.settle(ticket, None)
        assert await limiter.outstanding(key.id) == 0
    finally:
        await limiter.aclose()


def wall_clock(monkeypatch: pytest.MonkeyPatch, ahead: float) -> Callable[[], AbstractContextManager[None]]:
    """The wall clock (time.time) of a gateway `ahead` seconds ahead of the others, while its calls run."""
    real = time.time

    @contextmanager
    def running() -> Iterator[None]:
        with monkeypatch.context() as patch:
            patch.setattr(time, "time", lambda: real() + ahead)
            yield

    return running


async def test_gateways_with_clocks_apart_share_one_clock(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built as the app builds them; one replica's clock runs 120 s ahead of the other's (and of Redis').
    settings = LimitsSettings(backend="redis", redis_url=redis_url, key_prefix=prefix)
    as_ahead = wall_clock(monkeypatch, 120)
    with as_ahead():
        ahead = create_limiter(settings)
    behind = create_limiter(settings)
    try:
        pair = make_key("key_concurrency", max_concurrency=2)
        held = [await behind.acquire(pair, 0), await behind.acquire(pair, 0)]
        with as_ahead():
            # Timed by its own clock, this replica would see the other's leases as run out 60 s ago.
            assert (await refused(ahead, pair)).code == CONCURRENCY
            assert await ahead.outstanding(pair.id) == 2
        for ticket in held:
            await behind.settle(ticket, None)

        per_second = make_key("key_oncepersecond", rpm=60)
        with as_ahead():
            for _ in range(60):
                await ahead.settle(await ahead.acquire(per_second, 0), None)
            assert (await refused(ahead, per_second)).code == REQUESTS
        await asyncio.sleep(1.2)
        # One request refilled, for either replica: the bucket is not stamped two minutes into the future.
        ticket = await behind.acquire(per_second, 0)
        assert ticket.headers["x-ratelimit-remaining-requests"] == "0"
        await behind.settle(ticket, None)
    finally:
        await ahead.aclose()
        await behind.aclose()


async def test_a_replica_of_redis_stores_what_the_primary_stored(prefix: str) -> None:
    # The scripts read TIME; Redis replicates their effects (the numbers written), so a replica holds the same
    # stamps and lease expiries, not ones recomputed from its own clock.
    with redis_server() as primary_url:
        port = primary_url.rsplit(":", 1)[1].split("/")[0]
        with redis_server("--replicaof", "127.0.0.1", port) as replica_url:
            primary = aioredis.from_url(primary_url, decode_responses=True)
            replica = aioredis.from_url(replica_url, decode_responses=True)
            limiter = RedisLimiter(
                aioredis.from_url(primary_url, decode_responses=True), key_prefix=prefix, slot_lease=60
            )
            try:
                for _ in range(100):
                    if (await replica.info("replication"))["master_link_status"] == "up":
                        break
                    await asyncio.sleep(0.1)
                key = make_key(rpm=60, tpm=600, max_concurrency=2)
                ticket = await limiter.acquire(key, 100)
                await limiter.acquire(key, 50)
                await limiter.settle(ticket, 20)
                assert await primary.wait(1, 5000) == 1
                buckets = [f"{prefix}{{{key.id}}}:{part}" for part in ("requests", "tokens")]
                slots = f"{prefix}{{{key.id}}}:slots"
                for name in buckets:
                    stored = await primary.hgetall(name)
                    assert set(stored) == {"level", "stamp"}
                    assert await replica.hgetall(name) == stored
                leases = await primary.zrange(slots, 0, -1, withscores=True)
                assert len(leases) == 1
                assert await replica.zrange(slots, 0, -1, withscores=True) == leases
            finally:
                await limiter.aclose()
                await primary.aclose()
                await replica.aclose()


async def burst_then_restart(limiter: Limiter, key: KeyRecord, server: RedisServer, burst: int) -> None:
    """A burst fills the limiter's pool with connections; then Redis is killed and started again (empty): every
    pooled connection is broken."""
    tickets = await asyncio.gather(*(limiter.acquire(key, 1) for _ in range(burst)))
    await asyncio.gather(*(limiter.settle(t, 1) for t in tickets))
    server.kill()
    server.start()


def test_a_redis_restart_costs_no_slot_and_no_refusal_once_it_is_back(tmp_path: Path) -> None:
    """Pooled connections die with Redis; the limiter must not keep using them (slots would be held, 503s given)."""
    server = RedisServer(tmp_path / "redis.log")
    key = make_key("key_restart", max_concurrency=50)
    settings = LimitsSettings(backend="redis", redis_url=server.url, key_prefix=f"t{uuid.uuid4().hex}:")

    async def scenario() -> tuple[list[object], int]:
        limiter = create_limiter(settings)
        try:
            await burst_then_restart(limiter, key, server, 20)
            await asyncio.sleep(0.5)
            results = await asyncio.gather(*(limiter.acquire(key, 1) for _ in range(20)), return_exceptions=True)
            await asyncio.gather(*(limiter.settle(t, 1) for t in results if isinstance(t, Ticket)))
            return results, await limiter.outstanding(key.id)
        finally:
            await limiter.aclose()

    server.start()
    try:
        results, held = asyncio.run(scenario())
    finally:
        server.stop()
    refused = [r for r in results if isinstance(r, BaseException)]
    assert not refused, f"{len(refused)} of 20 admissions refused after Redis was back: {refused[0]!r}"
    assert held == 0, "slots stayed taken after their requests were settled"


def socket_fds() -> set[int]:
    found = set()
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{entry}").startswith("socket:"):
                found.add(int(entry))
    return found


def redis_sockets(port: int, before: set[int]) -> dict[str, int]:
    """This process's TCP connections to Redis by state, and the sockets opened since `before` that no socket table
    lists any more ("gone")."""
    states: dict[str, int] = {}
    listed = set()
    for c in psutil.Process().net_connections(kind="all"):
        listed.add(c.fd)
        if c.raddr and c.raddr.port == port:
            states[c.status] = states.get(c.status, 0) + 1
    gone = len(socket_fds() - listed - before)
    if gone:
        states["gone"] = gone
    return states


def test_connections_a_redis_restart_broke_are_closed_even_if_never_used_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst leaves the pool many connections; after a restart a trickle of calls uses only the newest. The others
    end in CLOSE_WAIT: they must be closed once idle for the expiry, not held for ever."""
    monkeypatch.setattr(redis_limits, "IDLE_EXPIRY_S", 1.0)
    server = RedisServer(tmp_path / "redis.log")
    key = make_key("key_restart2", max_concurrency=50)
    settings = LimitsSettings(backend="redis", redis_url=server.url, key_prefix=f"t{uuid.uuid4().hex}:")

    async def scenario() -> tuple[dict[str, int], dict[str, int]]:
        before = socket_fds()
        limiter = create_limiter(settings)
        try:
            await burst_then_restart(limiter, key, server, 10)
            # Counted before the loop runs anything else: the upkeep cannot have closed any yet.
            broken = redis_sockets(server.port, before)
            await asyncio.sleep(0.3)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # a trickle: one call at a time, for longer than the expiry
                await limiter.settle(await limiter.acquire(key, 1), 1)
                await asyncio.sleep(0.2)
            return broken, redis_sockets(server.port, before)
        finally:
            await limiter.aclose()

    server.start()
    try:
        broken, after = asyncio.run(scenario())
    finally:
        server.stop()
    assert broken.get("CLOSE_WAIT", 0) >= 5, f"the restart did not leave the pool's connections broken: {broken}"
    assert set(after) <= {"ESTABLISHED"} and after.get("ESTABLISHED", 0) <= 2, (
        f"Redis sockets after a trickle of calls past the idle expiry: {after} (just after the restart: {broken})"
    )
