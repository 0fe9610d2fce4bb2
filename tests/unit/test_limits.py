"""The in-process limiter on a fake clock, the 429 it raises, its headers and its settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve.config.gateway import GatewayFile, LimitsSettings
from serve.config.loader import ConfigError, load_model
from serve.gateway.errors import RateLimited
from serve.gateway.limits import MemoryLimiter, create_limiter
from serve.gateway.limits.base import format_reset
from tests.limits_contract import FakeClock, LimiterContract, make_key

pytestmark = pytest.mark.anyio

# The variable users set; named here as they type it.
REDIS_URL_ENV = "LLMSERVE_REDIS_URL"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> MemoryLimiter:
    return MemoryLimiter(clock=clock)


class TestMemoryLimiter(LimiterContract):
    pass


async def test_a_key_without_limits_is_always_admitted(limiter: MemoryLimiter) -> None:
    key = make_key()
    tickets = [await limiter.acquire(key, 1_000_000) for _ in range(1000)]
    assert all(ticket.headers == {} for ticket in tickets)
    assert len({ticket.id for ticket in tickets}) == 1000
    assert await limiter.outstanding(key.id) == 1000
    for ticket in tickets:
        await limiter.settle(ticket, 5)
    assert await limiter.outstanding(key.id) == 0


async def test_negative_reservation_is_a_programming_error(limiter: MemoryLimiter) -> None:
    with pytest.raises(ValueError, match="reserve_tokens"):
        await limiter.acquire(make_key(tpm=10), -1)


async def test_refusal_renders_as_the_openai_envelope(limiter: MemoryLimiter) -> None:
    key = make_key(rpm=1)
    await limiter.acquire(key, 0)
    with pytest.raises(RateLimited) as caught:
        await limiter.acquire(key, 0)
    body = caught.value.body()["error"]
    assert body["type"] == "rate_limit_error"
    assert body["code"] == "rate_limit_requests"
    assert body["message"] == "Rate limit reached for requests per minute (limit 1). Retry after 60 s."


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (1.5, "1.5s"), (60, "60s"), (59.75, "59.75s"), (0.0004, "0.001s"), (1 / 3, "0.334s"), (90.0, "90s")],
)
def test_reset_is_seconds_with_a_unit(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


async def test_factory_defaults_to_memory() -> None:
    limiter = create_limiter(LimitsSettings())
    assert isinstance(limiter, MemoryLimiter)
    await limiter.aclose()


def test_settings_in_the_gateway_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"limits": {"backend": "redis", "redis_url": "redis://10.0.0.5:6379/2"}}))
    limits = load_model(GatewayFile, path).limits
    assert (limits.backend, limits.resolved_redis_url()) == ("redis", "redis://10.0.0.5:6379/2")
    assert limits.key_prefix == "llmserve:limits:"
    assert GatewayFile().limits.backend == "memory"

    path.write_text(yaml.safe_dump({"limits": {"backend": "redis"}}))
    with pytest.raises(ConfigError, match=r"gateway\.yaml(.|\n)*limits(.|\n)*redis_url"):
        load_model(GatewayFile, path)
    monkeypatch.setenv(REDIS_URL_ENV, "redis://secret@redis:6379/0")
    assert load_model(GatewayFile, path).limits.resolved_redis_url() == "redis://secret@redis:6379/0"

    for bad in ({"backend": "postgres"}, {"redis_url": "http://x"}, {"slot_lease": 1}, {"rpm": 5}):
        path.write_text(yaml.safe_dump({"limits": bad}))
        with pytest.raises(ConfigError, match="limits"):
            load_model(GatewayFile, path)
