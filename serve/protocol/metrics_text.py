"""Reading an engine's Prometheus text exposition: the one parser the gateway's load reading and the benchmarks use."""

from __future__ import annotations

import math
from collections.abc import Iterable


def series_sums(text: str, names: Iterable[str]) -> dict[str, float]:
    """Each named metric's value summed over all its label sets; a name with no sample is left out. Names match
    exactly (`vllm:x_total` does not pick up `vllm:x_total_extra` nor `vllm:x_created`)."""
    wanted = frozenset(names)
    sums: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in wanted:
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (ValueError, IndexError):
            continue
        if math.isfinite(value):
            sums[name] = sums.get(name, 0.0) + value
    return sums
