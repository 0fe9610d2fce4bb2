"""The engine's own count of the tokens it generated, read from its Prometheus metrics while a level runs.

The client's output tok/s counts the tokens that reached it inside the window. The engine's counter
(`vllm:generation_tokens_total`) counts what the engine produced, whoever asked: read beside the client's figure
it tells a slower client or proxy apart from a slower engine, and it does not depend on how the window's edges cut
requests. A background thread samples the counter of every engine a target reaches; the tokens inside a window come
from the samples on either side of each edge, interpolated linearly (`POLL_S` bounds the error at each edge).

The same watch reads the gateway's `process_cpu_seconds_total`: the CPU its process spent inside the window, which
on a machine it shares with the engine is what the gateway costs, free of the drift that moves tok/s between runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from loadtests.stats import Window
from serve.protocol.metrics_text import series_sums

COUNTER = "vllm:generation_tokens_total"
CPU_COUNTER = "process_cpu_seconds_total"
POLL_S = 0.5


def counter_value(text: str, name: str = COUNTER) -> float | None:
    """The sum of a counter over all its label sets in Prometheus text (None when it is absent)."""
    return series_sums(text, (name,)).get(name)


def at(samples: Sequence[tuple[float, float]], t: float) -> float | None:
    """The counter at time t, interpolated between the samples around it (None outside them)."""
    for (ta, va), (tb, vb) in zip(samples, samples[1:], strict=False):
        if ta <= t <= tb:
            return va if tb == ta else va + (vb - va) * (t - ta) / (tb - ta)
    return None


def growth(samples: Sequence[tuple[float, float]], window: Window) -> float | None:
    """What the counter grew by inside the window's spans (None when the samples do not cover them all, or the
    counter went down: the process behind it restarted)."""
    total = 0.0
    for t0, t1 in window.spans:
        a, b = at(samples, t0), at(samples, t1)
        if a is None or b is None or b < a:
            return None
        total += b - a
    return total


@dataclass
class CounterWatch:
    """Samples a counter summed over some metrics URLs every `interval` seconds, in a thread."""

    urls: tuple[str, ...]
    key: str | None = None
    name: str = COUNTER
    interval: float = POLL_S
    samples: list[tuple[float, float]] = field(default_factory=list)
    failed: str | None = None  # why a sample could not be read, when one could not
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> CounterWatch:
        self._thread = threading.Thread(target=self._run, name=f"counter {self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        # trust_env=False: benchmark traffic goes to the engines, never through a proxy from the environment.
        with httpx.Client(timeout=5.0, trust_env=False, headers=headers) as client:
            while True:
                self.sample(client)
                if self._stop.wait(self.interval):
                    self.sample(client)  # one past the end of the run
                    return

    def sample(self, client: httpx.Client) -> None:
        total = 0.0
        for url in self.urls:
            try:
                value = counter_value(client.get(url).text, self.name)
            except httpx.HTTPError as exc:
                self.failed = f"{url}: {type(exc).__name__}: {exc}"
                return
            if value is None:
                self.failed = f"{url} has no {self.name}"
                return
            total += value
        # The time the answers came back: the counter's value is at most that old.
        self.samples.append((time.time(), total))

    def grown(self, window: Window) -> float | None:
        return growth(self.samples, window)
