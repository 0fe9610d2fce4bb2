"""Plots of a tenants run over time: each tenant's output tokens/s, and every request's TTFT and TPOT by when it
was sent, with the shared measured window shaded; the latency CDFs are the usual ones, a line per tenant."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402

from loadtests.accounting import RequestRecord, tokens_in_window  # noqa: E402
from loadtests.plots import DPI, plot_cdf, readable_log  # noqa: E402
from loadtests.runner import LevelResult  # noqa: E402

# At most this many bins over a run, none shorter than MIN_BIN_S (unless the run is), so a bin's rate is not a
# handful of tokens.
BINS = 60
MIN_BIN_S = 5.0
WINDOW_SHADE = {"color": "grey", "alpha": 0.12, "label": "measured window"}


def origin(results: Sequence[LevelResult]) -> float:
    starts = [r.start for result in results for r in result.records]
    return min(starts, default=results[0].window.t0 if results else 0.0)


def sent_at(r: RequestRecord) -> float:
    return r.scheduled if r.scheduled is not None else r.start


def bins(results: Sequence[LevelResult]) -> list[tuple[float, float]]:
    """[t0, t1) bins in Unix time from the first request to the last token of any tenant."""
    t0 = origin(results)
    ends = [r.end for result in results for r in result.records if r.end is not None]
    span = max(ends, default=t0) - t0
    if span <= 0:
        return []
    # Equal bins that end at the last token, so no bin's rate is diluted by time after the run.
    count = max(1, min(BINS, math.floor(span / MIN_BIN_S)))
    width = span / count
    edges = [(t0 + i * width, t0 + (i + 1) * width) for i in range(count)]
    # Bins are half-open: the last one holds the very last token too.
    edges[-1] = (edges[-1][0], math.nextafter(t0 + span, math.inf))
    return edges


def output_rates(records: Sequence[RequestRecord], edges: Sequence[tuple[float, float]]) -> list[float]:
    """Output tokens/s in each bin, from usage spread over each request's output events (as the totals are)."""
    return [sum(tokens_in_window(r, a, b)[0] for r in records) / (b - a) for a, b in edges]


def _title(ax: object, what: str, context: str) -> None:
    ax.set_title(f"{what}\n{context}" if context else what, fontsize=10)  # type: ignore[attr-defined]


def _shade(ax: object, results: Sequence[LevelResult], t0: float) -> None:
    window = results[0].window
    ax.axvspan(window.t0 - t0, window.t1 - t0, **WINDOW_SHADE)  # type: ignore[attr-defined]


def plot_throughput_timeline(path: Path, results: Sequence[LevelResult], context: str = "") -> None:
    fig, ax = plt.subplots(figsize=(10, 5))
    edges = bins(results)
    t0 = origin(results)
    mids = [(a + b) / 2 - t0 for a, b in edges]
    total = [0.0] * len(edges)
    for result in results:
        rates = output_rates(result.records, edges)
        total = [x + y for x, y in zip(total, rates, strict=True)]
        ax.plot(mids, rates, marker=".", label=f"{result.target} ({result.summary.output_tok_s:.1f} in the window)")
    if len(results) > 1:
        ax.plot(mids, total, color="black", linestyle=":", label="all tenants")
    if results:
        _shade(ax, results, t0)
    width = edges[0][1] - edges[0][0] if edges else MIN_BIN_S
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel(f"output tokens/s ({width:.0f} s bins, from server usage)")
    ax.set_ylim(bottom=0)
    _title(ax, "Output tokens/s per tenant over time", context)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_latency_timeline(path: Path, results: Sequence[LevelResult], context: str = "") -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    t0 = origin(results)

    def ttft(r: RequestRecord) -> float | None:
        # Open loop: from the time the request was due, as the summary counts it.
        return None if r.ttft is None else r.ttft + r.late

    panels = (
        (axes[0], "Time to first token, by when the request was sent", ttft),
        (axes[1], "Time per output token, by when the request was sent", lambda r: r.tpot),
    )
    for ax, title, value in panels:
        drawn: list[float] = []
        for result in results:
            points = [(sent_at(r) - t0, v * 1000) for r in result.records if r.ok and (v := value(r)) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.scatter(xs, ys, s=8, alpha=0.6, label=f"{result.target} (n={len(points)})")
                drawn += ys
        if results:
            _shade(ax, results, t0)
        ax.set_xlabel("seconds since the first request")
        ax.set_ylabel("milliseconds")
        readable_log(ax, "y", drawn)
        _title(ax, title, context)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_tenants(folder: Path, results: Sequence[LevelResult], context: str = "") -> None:
    """The same three files as a sweep's, over time instead of over load levels."""
    plot_throughput_timeline(folder / "throughput.png", results, context)
    plot_latency_timeline(folder / "latency.png", results, context)
    plot_cdf(folder / "latency_cdf.png", results, context)
