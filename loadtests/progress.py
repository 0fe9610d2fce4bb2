"""The live progress line of a level: elapsed / planned seconds, requests done, current output tokens/s."""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from loadtests.config import LoadConfig

# Seconds of progress markers the current tokens/s is averaged over.
RATE_WINDOW_S = 5.0


class Tail:
    """The new complete JSON lines of a file another process appends to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        out = []
        for line in complete:
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                out.append(parsed)
        return out


class LiveProgress:
    """Reads the Locust process's progress markers from its records file and prints one line about them.

    On a terminal the line is rewritten in place every second; elsewhere (a CI log) a new line every 15 seconds.
    """

    def __init__(self, label: str, records: Path, config: LoadConfig, out: TextIO) -> None:
        self.label = label
        self.config = config
        self.out = out
        self.tail = Tail(records)
        self.tty = out.isatty()
        self.every = 1.0 if self.tty else 15.0
        self.started: float | None = None
        self.latest: dict[str, Any] = {}
        self.samples: deque[tuple[float, float]] = deque()
        self.printed_at = 0.0
        self.printed = False

    def update(self, now: float | None = None) -> None:
        now = self.poll(now)
        if now - self.printed_at < self.every:
            return
        self.printed_at = now
        self.printed = True
        if self.tty:
            self.out.write("\r" + self.line(now) + "\033[K")
        else:
            self.out.write(self.line(now) + "\n")
        self.out.flush()

    def poll(self, now: float | None = None) -> float:
        """Read the markers written since the last call; returns the time it judged them at."""
        for data in self.tail.lines():
            kind = data.get("type")
            if kind == "start":
                self.started = float(data["t"])
            elif kind in ("progress", "stop"):
                self.latest = data
                self.samples.append((float(data["t"]), float(data.get("output_tokens", 0))))
        now = time.time() if now is None else now
        while len(self.samples) > 2 and self.samples[1][0] < now - RATE_WINDOW_S:
            self.samples.popleft()
        return now

    def rate(self) -> float:
        """Output tokens/s over the last few seconds of markers."""
        if len(self.samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return max(0.0, (n1 - n0) / (t1 - t0)) if t1 > t0 else 0.0

    def line(self, now: float) -> str:
        head = f"bench: {self.label}: "
        if self.started is None:
            return head + "starting Locust"
        c = self.config
        elapsed = max(0.0, now - self.started)
        planned = c.warmup + c.duration
        latest = self.latest
        in_flight = int(latest.get("sent", 0)) - int(latest.get("done", 0))
        if elapsed < c.warmup:
            phase = f"warm-up {elapsed:.0f}/{c.warmup:g} s"
        elif c.num_requests is not None:
            phase = f"{elapsed:.0f} s, {latest.get('measured_done', 0)}/{c.num_requests} measured requests done"
        elif elapsed <= planned:
            phase = f"{elapsed:.0f}/{planned:g} s"
        else:
            phase = f"{elapsed:.0f}/{planned:g} s, waiting for {in_flight} in flight (up to {c.stop_timeout:g} s)"
        return f"{head}{phase}, {latest.get('done', 0)} requests done, {self.rate():.1f} output tok/s"

    def close(self) -> None:
        if self.tty and self.printed:
            self.out.write("\r\033[K")
            self.out.flush()


class GroupProgress:
    """The progress of several Locust processes running at once (the tenants of one run): one part per process.

    On a terminal one line, the parts side by side, rewritten in place; elsewhere a line per part every 15 seconds.
    """

    def __init__(self, parts: list[LiveProgress], out: TextIO) -> None:
        self.parts = parts
        self.out = out
        self.tty = out.isatty()
        self.every = 1.0 if self.tty else 15.0
        self.printed_at = 0.0
        self.printed = False

    def update(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for part in self.parts:
            part.poll(now)
        if now - self.printed_at < self.every:
            return
        self.printed_at = now
        self.printed = True
        lines = [part.line(now) for part in self.parts]
        if self.tty:
            self.out.write("\r" + " | ".join(line.removeprefix("bench: ") for line in lines) + "\033[K")
        else:
            self.out.write("".join(line + "\n" for line in lines))
        self.out.flush()

    def close(self) -> None:
        if self.tty and self.printed:
            self.out.write("\r\033[K")
            self.out.flush()
