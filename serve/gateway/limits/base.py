"""Limits arithmetic and the limiter interface: token buckets, refusals, x-ratelimit headers, tickets."""

from __future__ import annotations

import math
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from serve.config.keys import KeyRecord
from serve.gateway.errors import RateLimited

# Seconds since an arbitrary origin; tests pass a fake one so that no test sleeps.
Clock = Callable[[], float]

# The error `code` of each refusal; the first three are also the order in which equal waits are reported.
REQUESTS = "rate_limit_requests"
TOKENS = "rate_limit_tokens"
CONCURRENCY = "concurrency_limit"
TOO_LARGE = "request_too_large_for_tpm"

# A concurrency refusal cannot know when a slot frees; one second is the shortest Retry-After there is.
CONCURRENCY_RETRY = 1.0


@dataclass(frozen=True)
class Limits:
    """A key's limits at admission; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None

    @classmethod
    def of(cls, key: KeyRecord) -> Limits:
        return cls(rpm=key.rpm, tpm=key.tpm, max_concurrency=key.max_concurrency)


@dataclass(frozen=True)
class Ticket:
    """An admitted request: what it holds until `settle`, and the x-ratelimit headers for its response."""

    id: str
    key_id: str
    limits: Limits
    reserved_tokens: int
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    """What a backend saw at admission, in one atomic step: bucket levels (None: no such limit) and slots in use."""

    requests: float | None
    tokens: float | None
    active: int


def refill(level: float, stamp: float, now: float, capacity: int) -> float:
    """A bucket of `capacity` that refills by capacity/60 per second, `now - stamp` seconds after it held `level`."""
    # A clock that steps back (another replica's, or NTP) must not drain the bucket.
    return min(float(capacity), level + max(0.0, now - stamp) * capacity / 60.0)


def seconds_to(level: float, wanted: float, capacity: int) -> float:
    return max(0.0, (wanted - level) * 60.0 / capacity)


def format_reset(seconds: float) -> str:
    """A duration in seconds with an `s` suffix, to the millisecond above: "0s", "1.5s", "60s"."""
    millis = math.ceil(round(seconds * 1000, 6))
    return f"{millis / 1000:.3f}".rstrip("0").rstrip(".") + "s"


def rate_headers(limits: Limits, requests: float | None, tokens: float | None) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the limits a key has, from bucket levels (after the request if admitted)."""
    headers: dict[str, str] = {}
    if limits.rpm is not None and requests is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, math.floor(requests)))
        headers["x-ratelimit-reset-requests"] = format_reset(seconds_to(requests, limits.rpm, limits.rpm))
    if limits.tpm is not None and tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(tokens)))
        headers["x-ratelimit-reset-tokens"] = format_reset(seconds_to(tokens, limits.tpm, limits.tpm))
    return headers


def failing(limits: Limits, reserve: int, seen: Observation) -> list[str]:
    """The limits this request would exceed, given what was observed."""
    failed = []
    if limits.rpm is not None and seen.requests is not None and seen.requests < 1:
        failed.append(REQUESTS)
    if limits.tpm is not None and seen.tokens is not None and seen.tokens < reserve:
        failed.append(TOKENS)
    if limits.max_concurrency is not None and seen.active >= limits.max_concurrency:
        failed.append(CONCURRENCY)
    return failed


def check_size(limits: Limits, reserve: int) -> None:
    """Refuse a request that no amount of waiting would admit (no Retry-After: retrying cannot help)."""
    if reserve < 0:
        raise ValueError(f"reserve_tokens must be >= 0, got {reserve}")
    if limits.tpm is not None and reserve > limits.tpm:
        raise RateLimited(
            f"This request may use up to {reserve} tokens (prompt plus max_tokens), more than this key's limit of "
            f"{limits.tpm} tokens per minute: lower max_tokens or shorten the prompt.",
            code=TOO_LARGE,
            headers={"x-ratelimit-limit-tokens": str(limits.tpm)},
        )


def refusal(limits: Limits, reserve: int, seen: Observation, failed: list[str]) -> RateLimited:
    """The 429 for a refused request: the limit with the longest wait names the error, Retry-After waits for all."""
    waits: dict[str, float] = {}
    if REQUESTS in failed and limits.rpm is not None and seen.requests is not None:
        waits[REQUESTS] = seconds_to(seen.requests, 1, limits.rpm)
    if TOKENS in failed and limits.tpm is not None and seen.tokens is not None:
        waits[TOKENS] = seconds_to(seen.tokens, reserve, limits.tpm)
    if CONCURRENCY in failed:
        waits[CONCURRENCY] = CONCURRENCY_RETRY
    code = max(waits, key=lambda name: waits[name])  # dicts keep insertion order: ties go to the first
    retry_after = max(1, math.ceil(round(max(waits.values()), 6)))
    messages = {
        REQUESTS: f"Rate limit reached for requests per minute (limit {limits.rpm}).",
        TOKENS: f"Rate limit reached for tokens per minute (limit {limits.tpm}, this request reserves {reserve}).",
        CONCURRENCY: f"Too many requests in flight for this key (limit {limits.max_concurrency}).",
    }
    headers = {"retry-after": str(retry_after), **rate_headers(limits, seen.requests, seen.tokens)}
    return RateLimited(f"{messages[code]} Retry after {retry_after} s.", code=code, headers=headers)


def new_ticket_id() -> str:
    return secrets.token_hex(12)


class Limiter(ABC):
    """Admits requests against their key's limits; every admitted request is settled exactly once."""

    @abstractmethod
    async def acquire(self, key: KeyRecord, reserve_tokens: int) -> Ticket:
        """Admit a request that may use up to `reserve_tokens` (prompt + max_tokens), or raise RateLimited.

        Every limit is checked first and taken only if all pass, atomically: a refusal consumes nothing.
        """

    @abstractmethod
    async def settle(self, ticket: Ticket, used_tokens: int | None) -> None:
        """End a request: give back the tokens it reserved but did not use (all of them when `used_tokens` is None)
        and free its concurrency slot. Settling a ticket again does nothing.

        Usage above the reservation is charged: the bucket may go below zero and later requests wait for it.
        """

    @abstractmethod
    async def outstanding(self, key_id: str) -> int:
        """Tickets of this key not settled yet (for every gateway sharing the backend)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release the backend's resources; tickets not settled by then are forgotten."""


def unused(ticket: Ticket, used_tokens: int | None) -> int:
    """Tokens to give back: negative when the request used more than it reserved."""
    if used_tokens is None:
        return ticket.reserved_tokens
    return ticket.reserved_tokens - max(0, used_tokens)
