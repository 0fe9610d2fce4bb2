"""Summaries of a run: percentiles, token throughput inside the measurement window, goodput under SLOs."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from loadtests.accounting import RequestRecord, tokens_in_window

PERCENTILES = (50, 90, 99)
# Below this many measured requests a level's percentiles are flagged as unreliable.
MIN_SAMPLES = 20
# Throughput is also counted in each quarter of the window; above this relative standard error (over the quarters)
# a level's tokens/s is flagged as depending on where its window fell.
QUARTERS = 4
UNSTEADY = 0.10


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


@dataclass(frozen=True)
class Distribution:
    """count, mean, p50/p90/p99 and max of some latencies; None where there is nothing to summarize."""

    count: int
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0)
        return cls(
            count=len(values),
            mean=sum(values) / len(values),
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            max=max(values),
        )


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
    """The measured part of a run: after the warm-up, before the load generator started stopping. A level run in
    rounds measures one such span per round: `rest` holds the spans after the first, and everything measured over
    the window counts over all of them."""

    t0: float
    t1: float
    rest: tuple[tuple[float, float], ...] = ()

    @classmethod
    def join(cls, windows: Sequence[Window]) -> Window:
        """One window over the spans of several, in time order (the rounds of a level do not overlap)."""
        spans = sorted(span for w in windows for span in w.spans)
        if not spans:
            raise ValueError("no window to join")
        (t0, t1), *rest = spans
        return cls(t0, t1, tuple(rest))

    @property
    def spans(self) -> tuple[tuple[float, float], ...]:
        return ((self.t0, self.t1), *self.rest)

    @property
    def seconds(self) -> float:
        return sum(max(0.0, b - a) for a, b in self.spans)

    def holds(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.spans)

    def tokens(self, record: RequestRecord) -> tuple[float, float]:
        """(output, prompt) tokens of a request produced inside the window's spans."""
        out = inp = 0.0
        for a, b in self.spans:
            o, i = tokens_in_window(record, a, b)
            out, inp = out + o, inp + i
        return out, inp


def started_in(records: Sequence[RequestRecord], window: Window) -> list[RequestRecord]:
    """Requests that belong to the window: sent (open loop: due) after the warm-up and before the stop."""
    return [r for r in records if window.holds(r.scheduled if r.scheduled is not None else r.start)]


@dataclass(frozen=True)
class Requests:
    started: int  # sent (open loop: due) inside the window
    measured: int  # of those, the ones that ended before the stop timeout
    ok: int
    failed: int
    error_rate: float
    cancelled_at_stop: int
    cancelled_with_tokens_in_window: int
    late: int
    streamed: int


@dataclass(frozen=True)
class Goodput:
    slo: SLO
    requests_s: float
    output_tok_s: float
    fraction: float


@dataclass(frozen=True)
class Tokens:
    prompt_mean: float | None
    output_mean: float | None
    output_total: int


@dataclass(frozen=True)
class Samples:
    """Whether a level measured enough requests for its percentiles to mean something, and what would."""

    measured: int  # requests whose latencies the percentiles are made of (started inside the window, ok)
    needed: int
    suggested_duration_s: float | None  # a --duration that would give `needed` at this level's pace

    @property
    def enough(self) -> bool:
        return self.measured >= self.needed

    def advice(self) -> str:
        """What to do about too few samples (empty when there are enough)."""
        if self.enough:
            return ""
        head = f"only {self.measured} measured requests (fewer than {self.needed}): its percentiles are unreliable"
        if self.suggested_duration_s is None:
            return f"{head}; no request finished, use --num-requests {self.needed} or a longer --stop-timeout"
        return f"{head}; use --duration {self.suggested_duration_s:g} or --num-requests {self.needed}"


@dataclass(frozen=True)
class Steadiness:
    """Output tokens/s in each quarter of the window, and how far the window's figure can be trusted from them.

    Closed-loop users whose requests finish together send again together: the engine then swings between
    prefilling a cohort and decoding it, and a window of a few request lifetimes catches more or less of either.
    The standard error over the quarters shows it, and a ratio of two targets carries both errors."""

    quarters: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.quarters) / len(self.quarters) if self.quarters else math.nan

    @property
    def error(self) -> float | None:
        """Standard error of the mean tokens/s, from the spread of the quarters (None without them)."""
        n = len(self.quarters)
        if n < 2:
            return None
        mean = self.mean
        variance = sum((q - mean) ** 2 for q in self.quarters) / (n - 1)
        return math.sqrt(variance / n)

    @property
    def relative(self) -> float | None:
        error, mean = self.error, self.mean
        return error / mean if error is not None and mean > 0 else None

    @property
    def steady(self) -> bool:
        return self.relative is None or self.relative <= UNSTEADY

    def advice(self) -> str:
        """What to do about a throughput that moved across the window (empty when it did not)."""
        if self.steady:
            return ""
        shown = ", ".join(f"{q:.0f}" for q in self.quarters)
        return (
            f"output tok/s moved across the window's quarters ({shown}; ± {self.relative:.0%} standard error): the "
            "figure depends on where the window fell (few requests, or requests finishing in waves); a longer "
            "--duration steadies it, and --output-spread breaks up the waves of a fixed --output-len"
        )

    def to_json(self) -> dict[str, Any]:
        return {"quarters": list(self.quarters), "error": self.error, "steady": self.steady}


def quarters(records: Sequence[RequestRecord], window: Window, parts: int = QUARTERS) -> tuple[float, ...]:
    """Output tokens/s inside each of `parts` equal slices of every span of the window (a level run in rounds
    has one span per round, so the spread then also holds the drift between rounds)."""
    edges = []
    for t0, t1 in window.spans:
        width = (t1 - t0) / parts
        if width > 0:
            edges += [(t0 + i * width, t0 + (i + 1) * width) for i in range(parts)]
    return tuple(sum(tokens_in_window(r, a, b)[0] for r in records) / (b - a) for a, b in edges)


@dataclass(frozen=True)
class Summary:
    """The numbers of one target at one level."""

    window_s: float
    requests: Requests
    errors: dict[str, int]
    output_tok_s: float
    prompt_tok_s: float
    total_tok_s: float
    requests_s: float
    goodput: Goodput
    ttft_s: Distribution
    tpot_s: Distribution
    itl_s: Distribution
    e2e_s: Distribution
    late_s: Distribution
    tokens: Tokens
    samples: Samples
    steadiness: Steadiness

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples"]["enough"] = self.samples.enough
        data["steadiness"] = self.steadiness.to_json()
        return data


def suggested_duration(measured: int, seconds: float, needed: int) -> float | None:
    """Seconds of window that would measure `needed` requests at the pace seen, rounded up to 10 s."""
    if measured <= 0 or seconds <= 0:
        return None
    return float(math.ceil(seconds * needed / measured / 10) * 10)


def summarize(
    records: Sequence[RequestRecord],
    window: Window,
    slo: SLO,
    *,
    open_loop: bool = False,
    late_tolerance: float = 0.05,
    min_samples: int = MIN_SAMPLES,
) -> Summary:
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
        out, inp = window.tokens(record)
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
    return Summary(
        window_s=seconds,
        requests=Requests(
            started=len(measured),
            measured=len(done),
            ok=len(ok),
            failed=len(failed),
            error_rate=len(failed) / len(done) if done else 0.0,
            cancelled_at_stop=len(measured) - len(done),
            cancelled_with_tokens_in_window=len(unfinished),
            late=sum(1 for r in measured if r.scheduled is not None and r.late > late_tolerance),
            streamed=len(streamed),
        ),
        errors=dict(errors.most_common(10)),
        output_tok_s=rate(output),
        prompt_tok_s=rate(prompt),
        total_tok_s=rate(output + prompt),
        requests_s=rate(finished),
        goodput=Goodput(
            slo=slo,
            requests_s=rate(len(good)),
            output_tok_s=rate(sum(r.completion_tokens or 0 for r in good)),
            fraction=len(good) / len(ok) if ok else 0.0,
        ),
        ttft_s=Distribution.of([r.ttft + late(r) for r in streamed if r.ttft is not None]),
        tpot_s=Distribution.of([t for r in streamed if (t := r.tpot) is not None]),
        itl_s=Distribution.of([gap for r in streamed for gap in r.itls]),
        e2e_s=Distribution.of([r.e2e + late(r) for r in ok if r.e2e is not None]),
        late_s=Distribution.of([r.late for r in measured if r.scheduled is not None]),
        tokens=Tokens(
            prompt_mean=sum(r.prompt_tokens or 0 for r in ok) / len(ok) if ok else None,
            output_mean=sum(r.completion_tokens or 0 for r in ok) / len(ok) if ok else None,
            output_total=sum(r.completion_tokens or 0 for r in ok),
        ),
        samples=Samples(len(ok), min_samples, suggested_duration(len(ok), seconds, min_samples)),
        steadiness=Steadiness(quarters(records, window)),
    )
