"""Numbers as the reports print them: a value at a scale, percentiles with their sample count."""

from __future__ import annotations

import math

from loadtests.stats import Distribution


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value * scale:.{digits}f}"


def percentiles(d: Distribution, scale: float = 1.0, digits: int = 0) -> str:
    """p50 / p99 with the number of samples they come from."""
    return f"{fmt(d.p50, scale, digits)} / {fmt(d.p99, scale, digits)} (n={d.count})"
