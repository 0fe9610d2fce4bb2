"""Load shapes: closed loop (N users back to back) or open loop (constant or Poisson arrivals at a given rate)."""

from __future__ import annotations

import random
from collections.abc import Iterator

# Open-loop arrival processes (closed loop has no arrivals: each user sends when its last request ends).
ARRIVALS = ("poisson", "constant")


def arrival_offsets(rate: float, process: str, seed: int = 0) -> Iterator[float]:
    """Seconds after the start at which each request is due: evenly spaced or exponential gaps with mean 1/rate."""
    if rate <= 0:
        raise ValueError("the arrival rate must be positive")
    if process == "constant":
        i = 0
        while True:
            yield i / rate
            i += 1
    elif process == "poisson":
        rng = random.Random(f"{seed}:arrivals")
        t = 0.0
        while True:
            yield t
            t += rng.expovariate(rate)
    else:
        raise ValueError(f"open-loop arrivals are 'constant' or 'poisson', not {process!r}")
