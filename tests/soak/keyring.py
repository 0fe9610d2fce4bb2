"""The soak's keys file: the load's keys, and one key that is revoked and replaced while the load runs."""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve.config.keys import FILE_MODE, KeyRecord, KeysFile, digest, generate_key

# How long a rewritten file may take to be in force: the gateway checks every 2 s and parses off the loop.
RELOAD_WITHIN = 10.0


def new_key(name: str, **limits: Any) -> tuple[str, KeyRecord]:
    plain = generate_key()
    record = KeyRecord(
        id="key_" + secrets.token_hex(6),
        name=name,
        sha256=digest(plain),
        created=datetime.now(UTC).replace(microsecond=0),
        **limits,
    )
    return plain, record


@dataclass
class Round:
    number: int
    t: float
    revoked: str | None = None
    added: str | None = None
    # Seconds until the gateway answered as the new file says (new key in, old key out); None: it never did.
    in_force_after: float | None = None


@dataclass
class KeyRing:
    path: Path
    # The load's own keys, never revoked: a 401 for either is a reload that lost keys.
    canary: tuple[str, KeyRecord]
    tight: tuple[str, KeyRecord]
    rotating: tuple[str, KeyRecord]
    rounds: list[Round] = field(default_factory=list)
    # Every plain key this run made: none may ever appear in a log.
    secrets: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    # The gateway that must follow the file (set once it runs).
    url: str = ""

    @classmethod
    def create(cls, path: Path, users: int) -> KeyRing:
        ring = cls(
            path,
            # A concurrency limit the load never reaches: admission still takes a slot in Redis for each request.
            canary=new_key("soak-canary", max_concurrency=4 * users),
            tight=new_key("soak-tight", max_concurrency=1, rpm=600),
            rotating=new_key("soak-rotating-0"),
        )
        for plain, record in (ring.canary, ring.tight, ring.rotating):
            ring.secrets.append(plain)
            ring.ids.append(record.id)
        ring.write(0)
        return ring

    def write(self, number: int) -> None:
        """The file's new bytes, in one rename; the comment makes even an unchanged key list a new file."""
        records = [self.canary[1], self.tight[1], self.rotating[1]]
        data = KeysFile(keys=records).model_dump(mode="json", exclude_none=True)
        text = f"# soak rewrite {number}\n" + yaml.safe_dump(data, sort_keys=False)
        tmp = self.path.with_name(f".{self.path.name}.{number}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, self.path)

    def rotate(self, number: int) -> Round:
        """Rewrite the file; every other round revoke the rotating key and add a new one."""
        rnd = Round(number=number, t=time.time())
        if number % 2 == 0:
            old = self.rotating
            self.rotating = new_key(f"soak-rotating-{number}")
            self.secrets.append(self.rotating[0])
            self.ids.append(self.rotating[1].id)
            rnd.revoked, rnd.added = old[1].id, self.rotating[1].id
            self.write(number)
            rnd.in_force_after = wait_in_force(self.url, accepted=self.rotating[0], refused=old[0])
        else:
            self.write(number)
            rnd.in_force_after = wait_in_force(self.url, accepted=self.rotating[0], refused=None)
        self.rounds.append(rnd)
        return rnd

    def run(self, stop: threading.Event, every: float) -> None:
        number = 0
        while not stop.wait(every):
            number += 1
            self.rotate(number)


def answers(url: str, key: str) -> int | None:
    try:
        return httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=5).status_code
    except httpx.HTTPError:
        return None


def wait_in_force(url: str, accepted: str, refused: str | None) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < RELOAD_WITHIN:
        ok = answers(url, accepted) == 200
        if ok and (refused is None or answers(url, refused) == 401):
            return round(time.monotonic() - start, 3)
        time.sleep(0.25)
    return None
