"""What every limiter backend must do, checked on a fake clock against numbers worked out by hand."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from serve.config.keys import KeyRecord
from serve.gateway.errors import RateLimited
from serve.gateway.limits.base import CONCURRENCY, REQUESTS, TOKENS, TOO_LARGE, Limiter


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_key(
    key_id: str = "key_abcdef",
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrency: int | None = None,
) -> KeyRecord:
    return KeyRecord(
        id=key_id,
        name="test",
        sha256="0" * 64,
        created=datetime(2025, 1, 1, tzinfo=UTC),
        rpm=rpm,
        tpm=tpm,
        max_concurrency=max_concurrency,
    )


async def refused(limiter: Limiter, key: KeyRecord, reserve: int = 0) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await limiter.acquire(key, reserve)
    assert caught.value.status == 429
    assert caught.value.type == "rate_limit_error"
    return caught.value


class LimiterContract:
    """Subclasses provide `limiter` (fresh, empty) and `clock` (the FakeClock that limiter reads) fixtures."""

    async def test_requests_bucket_holds_rpm_and_refills_rpm_per_minute(
        self, limiter: Limiter, clock: FakeClock
    ) -> None:
        key = make_key(rpm=120)  # refills 2 requests per second
        first = await limiter.acquire(key, 0)
        assert first.headers == {
            "x-ratelimit-limit-requests": "120",
            "x-ratelimit-remaining-requests": "119",
            "x-ratelimit-reset-requests": "0.5s",
        }
        for _ in range(119):
            last = await limiter.acquire(key, 0)
        assert last.headers["x-ratelimit-remaining-requests"] == "0"
        assert last.headers["x-ratelimit-reset-requests"] == "60s"

        err = await refused(limiter, key)
        assert err.code == REQUESTS
        assert err.headers["retry-after"] == "1"  # 0.5 s, rounded up to whole seconds
        assert err.headers["x-ratelimit-remaining-requests"] == "0"

        clock.advance(0.25)  # half a request back: still not one
        err = await refused(limiter, key)
        assert err.headers["x-ratelimit-reset-requests"] == "59.75s"

        clock.advance(0.25)
        ticket = await limiter.acquire(key, 0)
        assert ticket.headers["x-ratelimit-remaining-requests"] == "0"

        clock.advance(30)  # 60 back
        ticket = await limiter.acquire(key, 0)
        assert ticket.headers["x-ratelimit-remaining-requests"] == "59"
        assert ticket.headers["x-ratelimit-reset-requests"] == "30.5s"  # 61 missing at 2 per second

    async def test_retry_after_is_the_wait_rounded_up(self, limiter: Limiter, clock: FakeClock) -> None:
        key = make_key(rpm=6)  # one request per 10 s
        for _ in range(6):
            await limiter.acquire(key, 0)
        assert (await refused(limiter, key)).headers["retry-after"] == "10"
        clock.advance(4)
        assert (await refused(limiter, key)).headers["retry-after"] == "6"
        clock.advance(5.5)
        assert (await refused(limiter, key)).headers["retry-after"] == "1"
        clock.advance(0.5)
        await limiter.acquire(key, 0)

    async def test_tokens_are_reserved_then_the_unused_part_given_back(
        self, limiter: Limiter, clock: FakeClock
    ) -> None:
        key = make_key(tpm=600)  # 10 tokens per second
        t1 = await limiter.acquire(key, 400)
        assert t1.reserved_tokens == 400
        assert t1.headers == {
            "x-ratelimit-limit-tokens": "600",
            "x-ratelimit-remaining-tokens": "200",
            "x-ratelimit-reset-tokens": "40s",
        }
        err = await refused(limiter, key, 400)
        assert err.code == TOKENS
        assert err.headers["retry-after"] == "20"
        assert err.headers["x-ratelimit-remaining-tokens"] == "200"

        await limiter.settle(t1, 100)  # 300 come back
        t2 = await limiter.acquire(key, 400)
        assert t2.headers["x-ratelimit-remaining-tokens"] == "100"

        await limiter.settle(t1, 0)  # settled already: gives nothing back again
        assert (await refused(limiter, key, 101)).headers["x-ratelimit-remaining-tokens"] == "100"

        await limiter.settle(t2, None)  # never ran: the whole reservation comes back
        t3 = await limiter.acquire(key, 500)
        assert t3.headers["x-ratelimit-remaining-tokens"] == "0"

    async def test_give_back_is_capped_and_overuse_is_charged(self, limiter: Limiter, clock: FakeClock) -> None:
        key = make_key(tpm=600)
        ticket = await limiter.acquire(key, 300)
        clock.advance(60)  # full again while the request ran
        await limiter.settle(ticket, None)
        probe = await limiter.acquire(key, 0)
        assert probe.headers["x-ratelimit-remaining-tokens"] == "600"
        await limiter.settle(probe, 0)

        ticket = await limiter.acquire(key, 600)
        await limiter.settle(ticket, 900)  # 300 more than reserved: the bucket goes to -300
        err = await refused(limiter, key, 1)
        assert err.headers["retry-after"] == "31"  # 301 tokens at 10 per second
        assert err.headers["x-ratelimit-remaining-tokens"] == "0"
        assert err.headers["x-ratelimit-reset-tokens"] == "90s"

    async def test_a_refusal_by_one_limit_consumes_nothing_of_the_others(
        self, limiter: Limiter, clock: FakeClock
    ) -> None:
        key = make_key(rpm=60, tpm=600, max_concurrency=1)
        held = await limiter.acquire(key, 100)

        err = await refused(limiter, key, 100)
        assert err.code == CONCURRENCY
        assert err.headers["x-ratelimit-remaining-requests"] == "59"
        assert err.headers["x-ratelimit-remaining-tokens"] == "500"
        await limiter.settle(held, 100)

        err = await refused(limiter, key, 600)
        assert err.code == TOKENS
        assert err.headers["x-ratelimit-remaining-requests"] == "59"
        assert await limiter.outstanding(key.id) == 0

        ticket = await limiter.acquire(key, 500)
        assert ticket.headers["x-ratelimit-remaining-requests"] == "58"
        assert ticket.headers["x-ratelimit-remaining-tokens"] == "0"
        await limiter.settle(ticket, None)

        once = make_key("key_onceaminute", rpm=1, tpm=600, max_concurrency=1)
        await limiter.settle(await limiter.acquire(once, 100), None)
        err = await refused(limiter, once, 100)
        assert err.code == REQUESTS
        assert err.headers["x-ratelimit-remaining-tokens"] == "600"
        assert await limiter.outstanding(once.id) == 0

    async def test_a_request_larger_than_tpm_is_refused_up_front(self, limiter: Limiter, clock: FakeClock) -> None:
        key = make_key(rpm=10, tpm=100)
        err = await refused(limiter, key, 101)
        assert err.code == TOO_LARGE
        assert "101" in err.message and "100" in err.message
        assert "retry-after" not in err.headers  # waiting cannot make it fit
        assert err.headers["x-ratelimit-limit-tokens"] == "100"
        ticket = await limiter.acquire(key, 100)
        assert ticket.headers["x-ratelimit-remaining-requests"] == "9"
        assert ticket.headers["x-ratelimit-remaining-tokens"] == "0"

    async def test_concurrency_slots_are_released_once(self, limiter: Limiter, clock: FakeClock) -> None:
        key = make_key(max_concurrency=2)
        a = await limiter.acquire(key, 10)
        b = await limiter.acquire(key, 10)
        assert a.id != b.id
        assert a.headers == {}  # no rate limits on this key, so no x-ratelimit headers
        err = await refused(limiter, key)
        assert err.code == CONCURRENCY
        assert err.headers == {"retry-after": "1"}
        assert await limiter.outstanding(key.id) == 2

        await limiter.settle(a, 10)
        await limiter.settle(a, 10)
        assert await limiter.outstanding(key.id) == 1
        c = await limiter.acquire(key, 10)
        await refused(limiter, key)

        await limiter.settle(b, None)
        await limiter.settle(c, 3)
        assert await limiter.outstanding(key.id) == 0

    async def test_the_longest_wait_names_the_refusal(self, limiter: Limiter, clock: FakeClock) -> None:
        key = make_key(rpm=1, tpm=600)
        await limiter.acquire(key, 600)
        err = await refused(limiter, key, 300)  # requests: 60 s, tokens: 30 s
        assert (err.code, err.headers["retry-after"]) == (REQUESTS, "60")
        clock.advance(45)  # requests: 15 s more; tokens: 450 >= 300
        err = await refused(limiter, key, 300)
        assert (err.code, err.headers["retry-after"]) == (REQUESTS, "15")

        both = make_key("key_tokensandslots", tpm=600, max_concurrency=1)
        await limiter.acquire(both, 600)
        err = await refused(limiter, both, 100)  # tokens: 10 s, concurrency: 1 s
        assert (err.code, err.headers["retry-after"]) == (TOKENS, "10")

    async def test_keys_have_their_own_budgets(self, limiter: Limiter, clock: FakeClock) -> None:
        a, b = make_key("key_aaaaaa", rpm=1), make_key("key_bbbbbb", rpm=1)
        await limiter.acquire(a, 0)
        await refused(limiter, a)
        await limiter.acquire(b, 0)

    async def test_a_clock_stepping_back_neither_drains_nor_refills_twice(
        self, limiter: Limiter, clock: FakeClock
    ) -> None:
        key = make_key(rpm=60)
        await limiter.acquire(key, 0)  # 59 left
        clock.advance(-10)
        assert (await limiter.acquire(key, 0)).headers["x-ratelimit-remaining-requests"] == "58"
        clock.advance(11)  # one second after the latest stamp: one request back, not eleven
        assert (await limiter.acquire(key, 0)).headers["x-ratelimit-remaining-requests"] == "58"

    async def test_a_lowered_limit_applies_to_the_next_request(self, limiter: Limiter, clock: FakeClock) -> None:
        key = make_key(rpm=60)
        await limiter.acquire(key, 0)
        lowered = key.model_copy(update={"rpm": 10})
        ticket = await limiter.acquire(lowered, 0)
        assert ticket.headers["x-ratelimit-limit-requests"] == "10"
        assert ticket.headers["x-ratelimit-remaining-requests"] == "9"
