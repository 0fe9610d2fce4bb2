"""The soak's load: Locust users past the engine's max_num_seqs, streams cancelled at random points, slow readers.

tests/soak/test_soak.py runs it headless on loopback and sets its environment (names in `Settings.from_env`). Every
request is written to SOAK_RECORDS as one JSON line (times, user kind, outcome, status): never a key or a prompt.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import gevent
from locust import User, between, task
from locust.exception import StopUser

from tests.soak.http_client import Closed, Connection

# Reads that take longer than this are a hung gateway: the request fails and the user goes on.
NETWORK_TIMEOUT = 180.0
STREAM_SHARE = 0.8
CHAT_SHARE = 0.8


@dataclass(frozen=True)
class Settings:
    key: str
    tight_key: str
    model: str
    canary: str
    records: str
    max_requests: int
    cancel: float
    slow_users: int
    tight_users: int
    seed: int

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            key=env["SOAK_KEY"],
            tight_key=env["SOAK_TIGHT_KEY"],
            model=env["SOAK_MODEL"],
            canary=env["SOAK_CANARY"],
            records=env["SOAK_RECORDS"],
            max_requests=int(env["SOAK_MAX_REQUESTS"]),
            cancel=float(env["SOAK_CANCEL"]),
            slow_users=int(env["SOAK_SLOW_USERS"]),
            tight_users=int(env["SOAK_TIGHT_USERS"]),
            seed=int(env["SOAK_SEED"]),
        )


SETTINGS = Settings.from_env()
SENT = itertools.count()
# Line-buffered and left open until the process exits: users still finishing after Locust's quitting event (its
# stop on SIGTERM) write their records too.
RECORDS = open(SETTINGS.records, "a", buffering=1)  # noqa: SIM115


@dataclass
class Plan:
    """One request: where it goes, what it asks, and where (if anywhere) the client hangs up."""

    path: str
    body: dict[str, Any]
    stream: bool
    # None: read to the end. -1: hang up before the answer's head, after `delay` seconds. k >= 0: after k events.
    cut: int | None = None
    delay: float = 0.0


def plan(rng: random.Random, cancel: float, stream_share: float = STREAM_SHARE) -> Plan:
    n = rng.randint(1, 10_000)
    stream = rng.random() < stream_share
    max_tokens = rng.randint(16, 64)
    if rng.random() < CHAT_SHARE:
        path = "/v1/chat/completions"
        content = f"{SETTINGS.canary} Tell me one fact about the number {n}."
        body: dict[str, Any] = {"model": SETTINGS.model, "messages": [{"role": "user", "content": content}]}
    else:
        path = "/v1/completions"
        body = {"model": SETTINGS.model, "prompt": f"{SETTINGS.canary} A fact about the number {n}:"}
    body |= {"max_tokens": max_tokens, "stream": stream}
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    p = Plan(path, body, stream)
    if stream and rng.random() < cancel:
        if rng.random() < 0.2:
            p.cut, p.delay = -1, rng.uniform(0.0, 1.5)
        else:
            p.cut = rng.randint(0, max_tokens)
    return p


class SoakUser(User):
    """Sends plans one after another on one keep-alive connection; backs off as Retry-After says."""

    abstract = True
    wait_time = between(0.0, 0.3)
    kind = "stream"
    rcvbuf: int | None = None
    read_size = 65536
    pause = 0.0
    stream_share = STREAM_SHARE
    cancel = SETTINGS.cancel

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        target = urlsplit(self.host)
        self.address = (target.hostname or "127.0.0.1", target.port or 80)
        self.rng = random.Random(f"{SETTINGS.seed}-{id(self)}")
        self.conn: Connection | None = None

    def key(self) -> str:
        return SETTINGS.key

    def connection(self) -> Connection:
        if self.conn is None or not self.conn.reusable:
            if self.conn is not None:
                self.conn.close()
            self.conn = Connection(*self.address, NETWORK_TIMEOUT, self.rcvbuf, self.read_size, self.pause)
        return self.conn

    def on_stop(self) -> None:
        if self.conn is not None:
            self.conn.close()

    @task
    def one(self) -> None:
        if next(SENT) >= SETTINGS.max_requests:
            raise StopUser()
        p = plan(self.rng, self.cancel, self.stream_share)
        record: dict[str, Any] = {"t0": time.time(), "user": self.kind, "stream": p.stream, "route": p.path}
        start = time.perf_counter()
        backoff = 0.0
        try:
            backoff = self.exchange(p, record)
        except (Closed, OSError, ValueError) as exc:
            # A reset, a timeout or garbage: the answer broke. The socket is not reused.
            record["outcome"] = f"broken:{type(exc).__name__}"
            if self.conn is not None:
                self.conn.close()
        record["t1"] = time.time()
        ms = (time.perf_counter() - start) * 1000
        RECORDS.write(json.dumps(record) + "\n")
        outcome = record["outcome"]
        failed = None if outcome in ("ok", "cancelled") else Exception(outcome)
        self.environment.events.request.fire(
            request_type=self.kind,
            name=p.path,
            response_time=ms,
            response_length=record.get("bytes", 0),
            exception=failed,
            context={},
        )
        if backoff:
            gevent.sleep(backoff)

    def exchange(self, p: Plan, record: dict[str, Any]) -> float:
        """Send the plan; fill `record`; return seconds to wait before the next request (Retry-After)."""
        conn = self.connection()
        headers = {"Authorization": f"Bearer {self.key()}", "Content-Type": "application/json"}
        if p.stream:
            headers["Accept"] = "text/event-stream"
        conn.request("POST", p.path, headers, json.dumps(p.body).encode())
        if p.cut == -1:
            gevent.sleep(p.delay)
            conn.close()
            record["outcome"] = "cancelled"
            return 0.0
        status, head = conn.head()
        record["status"] = status
        if status != 200:
            data = b"".join(conn.body())
            record["bytes"] = len(data)
            record["outcome"] = f"status:{status}"
            record["code"] = error_code(data)
            retry = head.get("retry-after")
            return float(retry) if retry and retry.isdigit() else 0.0
        if not p.stream:
            data = b"".join(conn.body())
            record["bytes"] = len(data)
            record["outcome"] = "ok" if b'"choices"' in data else "bad_body"
            return 0.0
        self.read_stream(conn, p, record)
        return 0.0

    def read_stream(self, conn: Connection, p: Plan, record: dict[str, Any]) -> None:
        events_seen, size, pending, done, error = 0, 0, b"", False, None
        for piece in conn.body():
            size += len(piece)
            pending += piece
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                elif data.startswith(b'{"error"'):
                    error = error_code(data) or "unknown"
                else:
                    events_seen += 1
            if p.cut is not None and events_seen >= p.cut and not done:
                conn.close()
                record |= {"outcome": "cancelled", "events": events_seen, "bytes": size}
                return
        record["events"], record["bytes"] = events_seen, size
        if error is not None:
            record["outcome"] = f"stream_error:{error}"
        else:
            record["outcome"] = "ok" if done else "truncated"


def error_code(data: bytes) -> str | None:
    """The `code` (else `type`) of an OpenAI error envelope; None if the body is not one."""
    try:
        err = json.loads(data).get("error")
    except (ValueError, AttributeError):
        return None
    if not isinstance(err, dict):
        return None
    return str(err.get("code") or err.get("type") or "none")


class Streamer(SoakUser):
    """Most of the load: streamed and plain chat and completions; 10% of streams hung up on at random points."""

    weight = 1


class SlowReader(SoakUser):
    """Reads its streams through a small receive buffer, 128 bytes every 0.1 s: slower than the engine writes."""

    kind = "slow"
    fixed_count = SETTINGS.slow_users
    rcvbuf = 4096
    read_size = 128
    pause = 0.1
    stream_share = 1.0
    cancel = 0.0


class TightKey(SoakUser):
    """A key with one request at a time: its users meet 429s, and their slots must all come back."""

    kind = "tight"
    fixed_count = SETTINGS.tight_users

    def key(self) -> str:
        return SETTINGS.tight_key
