"""Summaries of a run: percentiles, token throughput inside the measurement window, goodput under SLOs."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loadtests.accounting import RequestRecord, tokens_in_window

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError("q is a percentage between 0 and 100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50/p90/p99 and max; None when there is nothing to summarize (JSON has no NaN)."""
    if not values:
        return {"count": 0, "mean": None, **{f"p{q}": None for q in PERCENTILES}, "max": None}
    return {
        "count": len(values),
        "mean": sum(values) / len(values),
        **{f"p{q}": percentile(values, q) for q in PERCENTILES},
        "max": max(values),
    }


@dataclass(frozen=True)
class SLO:
    """Service-level objectives a request must all meet to count toward goodput (None: not checked)."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    def met(self, record: RequestRecord, late: float = 0.0) -> bool:
        if not record.ok:
            return False
        checks = (
            (self.ttft, None if record.ttft is None else record.ttft + late),
            (self.tpot, record.tpot),
            (self.e2e, None if record.e2e is None else record.e2e + late),
        )
        return all(limit is None or value is None or value <= limit for limit, value in checks)


@dataclass(frozen=True)
class Window:
    """The measured part of a run: after the warm-up, before the load generator started stopping."""

    t0: float
    t1: float

    @property
    def seconds(self) -> float:
        return max(0.0, self.t1 - self.t0)

    def holds(self, t: float) -> bool:
        return self.t0 <= t < self.t1


def started_in(records: Sequence[RequestRecord], window: Window) -> list[RequestRecord]:
    """Requests that belong to the window: sent (open loop: due) after the warm-up and before the stop."""
    return [r for r in records if window.holds(r.scheduled if r.scheduled is not None else r.start)]


def summarize(
    records: Sequence[RequestRecord],
    window: Window,
    slo: SLO,
    *,
    open_loop: bool = False,
    late_tolerance: float = 0.05,
) -> dict[str, Any]:
    """The numbers of one run. Throughput counts the tokens produced inside the window (whichever request they
    belong to); latencies and errors count the requests started inside it. In open loop the latencies run from the
    time a request was due, so a late send shows up as latency instead of vanishing (coordinated omission)."""
    seconds = window.seconds
    measured = started_in(records, window)
    done = [r for r in measured if not r.cancelled]
    ok = [r for r in done if r.ok]
    failed = [r for r in done if not r.ok]
    output = prompt = 0.0
    for record in records:
        out, inp = tokens_in_window(record, window.t0, window.t1)
        output += out
        prompt += inp
    finished = sum(1 for r in records if r.ok and r.end is not None and window.holds(r.end))
    # Requests still running when the stop timeout ran out have no usage: their tokens inside the window are missing
    # from the throughput (reported, never estimated from chunk counts).
    unfinished = [r for r in records if r.cancelled and any(window.holds(r.start + t) for t in r.chunk_times)]

    def late(r: RequestRecord) -> float:
        return r.late if open_loop else 0.0

    streamed = [r for r in ok if r.stream]
    good = [r for r in ok if slo.met(r, late(r))]
    errors = Counter((r.error or "failed")[:120] for r in failed)
    rate = (lambda n: n / seconds) if seconds > 0 else (lambda n: math.nan)
    return {
        "window_s": seconds,
        "requests": {
            "started": len(measured),
            "measured": len(done),
            "ok": len(ok),
            "failed": len(failed),
            "error_rate": len(failed) / len(done) if done else 0.0,
            "cancelled_at_stop": len(measured) - len(done),
            "cancelled_with_tokens_in_window": len(unfinished),
            "late": sum(1 for r in measured if r.scheduled is not None and r.late > late_tolerance),
            "streamed": len(streamed),
        },
        "errors": dict(errors.most_common(10)),
        "output_tok_s": rate(output),
        "prompt_tok_s": rate(prompt),
        "total_tok_s": rate(output + prompt),
        "requests_s": rate(finished),
        "goodput": {
            "slo": {"ttft_s": slo.ttft, "tpot_s": slo.tpot, "e2e_s": slo.e2e},
            "requests_s": rate(len(good)),
            "output_tok_s": rate(sum(r.completion_tokens or 0 for r in good)),
            "fraction": len(good) / len(ok) if ok else 0.0,
        },
        "ttft_s": distribution([r.ttft + late(r) for r in streamed if r.ttft is not None]),
        "tpot_s": distribution([t for r in streamed if (t := r.tpot) is not None]),
        "itl_s": distribution([gap for r in streamed for gap in r.itls]),
        "e2e_s": distribution([r.e2e + late(r) for r in ok if r.e2e is not None]),
        "late_s": distribution([r.late for r in measured if r.scheduled is not None]),
        "tokens": {
            "prompt_mean": sum(r.prompt_tokens or 0 for r in ok) / len(ok) if ok else None,
            "output_mean": sum(r.completion_tokens or 0 for r in ok) / len(ok) if ok else None,
            "output_total": sum(r.completion_tokens or 0 for r in ok),
        },
    }
