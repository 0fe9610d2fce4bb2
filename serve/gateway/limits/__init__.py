"""Per-key limits: the limiter interface, and the backend a gateway's settings choose (memory or Redis)."""

from __future__ import annotations

import time

from serve.config.gateway import LimitsSettings
from serve.gateway.limits.base import Clock, Limiter, Ticket
from serve.gateway.limits.memory import MemoryLimiter
from serve.gateway.limits.redis import RedisLimiter

__all__ = ["Limiter", "MemoryLimiter", "RedisLimiter", "Ticket", "create_limiter"]


def create_limiter(settings: LimitsSettings, clock: Clock | None = None) -> Limiter:
    """The limiter the settings ask for; the caller owns it and closes it with `aclose()`.

    `clock` is for tests: the memory backend's clock, or the time the Redis scripts use instead of Redis' own.
    """
    if settings.backend == "redis":
        return RedisLimiter.from_settings(settings, clock=clock)
    return MemoryLimiter(clock=clock or time.monotonic)
