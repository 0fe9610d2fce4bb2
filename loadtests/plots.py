"""PNG plots of a run: tokens/s and latency percentiles against load, and latency CDFs, each axis labelled."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from loadtests.accounting import RequestRecord  # noqa: E402
from loadtests.runner import LevelResult  # noqa: E402
from loadtests.stats import Distribution  # noqa: E402

DPI = 110
FEW_SAMPLES = "hollow marker: fewer samples than the report trusts"


def number(value: float, _: object = None) -> str:
    """A tick label: plain digits, never 10^x (thousands grouped)."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


# Round numbers a narrow log axis may label, per decade.
_ROUND = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)


def log_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Labelled tick positions for a log axis over [low, high].

    Over several decades, 1-2-5 steps per decade (powers of ten alone when that is too many). Over a decade or so
    there may be no power of ten in range at all, so round numbers about evenly spaced on the log scale are picked.
    """
    if low <= 0 or high <= low:
        return [low] if low > 0 else [1.0]
    span = high / low
    subs = (1.0,) if span > 1e4 else (1.0, 2.0, 5.0) if span >= 20 else _ROUND
    candidates = []
    decade = 10.0 ** math.floor(math.log10(low))
    while decade <= high:
        candidates += [decade * s for s in subs if low <= decade * s <= high]
        decade *= 10
    if len(candidates) < 3 and span < 20:
        # Narrower than the round numbers: evenly spaced ones, as a linear axis would have.
        ticks = MaxNLocator(nbins=6, steps=[1, 2, 5, 10]).tick_values(low, high)
        return [float(t) for t in ticks if low <= t <= high]
    if span >= 20 or len(candidates) <= count:
        return candidates
    wanted = [low * span ** (i / (count - 1)) for i in range(count)]
    return sorted({min(candidates, key=lambda c: abs(math.log(c / w))) for w in wanted})


def readable_log(ax: Any, which: str, values: Sequence[float]) -> None:
    """A log axis over `values` with a number on every labelled tick, whatever the range."""
    positive = [v for v in values if v > 0]
    if not positive:
        return
    low, high = min(positive), max(positive)
    if high == low:
        low, high = low / 1.5, high * 1.5
    # A margin of 5% of the range on the log scale (at least 1%): a narrow range still fills the axis.
    margin = max(1.01, (high / low) ** 0.05)
    low, high = low / margin, high * margin
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    (ax.set_ylim if which == "y" else ax.set_xlim)(low, high)
    axis.set_major_locator(FixedLocator(log_ticks(low, high)))
    axis.set_major_formatter(FuncFormatter(number))
    axis.set_minor_formatter(NullFormatter())


def level_axis(ax: Any, results: Sequence[LevelResult]) -> None:
    """The x axis of load levels, a tick at each level measured (log-spaced when they span a wide range)."""
    xs = sorted({r.level.value for r in results})
    if not xs:
        return
    if xs[0] > 0 and xs[-1] / xs[0] >= 8:
        ax.set_xscale("log")
        ax.set_xlim(xs[0] / 1.3, xs[-1] * 1.3)
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_major_formatter(FuncFormatter(number))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.set_xlabel("arrival rate (requests/s)" if any(r.level.rate is not None for r in results) else "concurrent users")


def _by_target(results: Sequence[LevelResult]) -> dict[str, list[LevelResult]]:
    out: dict[str, list[LevelResult]] = {}
    for r in results:
        out.setdefault(r.target, []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r.level.value)
    return out


def _counts(ns: Sequence[int]) -> str:
    low, high = min(ns), max(ns)
    return f"n={low}" if low == high else f"n={low}-{high}"


def _series(
    ax: Any,
    rows: Sequence[LevelResult],
    y: Callable[[LevelResult], float | None],
    n: Callable[[LevelResult], int],
    label: str,
    **style: Any,
) -> list[float]:
    """One line over the levels; points from too few samples drawn hollow. Returns the y values drawn."""
    points = [(r.level.value, v, r) for r in rows if (v := y(r)) is not None]
    if not points:
        return []
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    (line,) = ax.plot(xs, ys, label=f"{label} ({_counts([n(p[2]) for p in points])})", **style)
    few = [(x, v) for x, v, r in points if not r.summary.samples.enough]
    if few:
        ax.plot(
            *zip(*few, strict=True), linestyle="none", marker="o", markersize=9, mfc="white", color=line.get_color()
        )
    return ys


def _title(ax: Any, what: str, context: str) -> None:
    ax.set_title(f"{what}\n{context}" if context else what, fontsize=10)


def _legend(ax: Any, results: Sequence[LevelResult], size: int = 7) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if any(not r.summary.samples.enough for r in results):
        handles.append(Line2D([], [], linestyle="none", marker="o", mfc="white", color="grey"))
        labels.append(FEW_SAMPLES)
    ax.legend(handles, labels, fontsize=size)


def plot_throughput(path: Path, results: Sequence[LevelResult], context: str = "") -> None:
    fig, ax = plt.subplots(figsize=(8, 5))

    def measured(r: LevelResult) -> int:
        return r.summary.samples.measured

    for target, rows in _by_target(results).items():
        _series(ax, rows, lambda r: r.summary.output_tok_s, measured, f"{target} output", marker="o")
        _series(ax, rows, lambda r: r.summary.total_tok_s, measured, f"{target} total", marker=".", linestyle=":")
    level_axis(ax, results)
    ax.set_ylabel("tokens/s (from server usage)")
    ax.set_ylim(bottom=0)
    _title(ax, "Throughput (n: measured requests)", context)
    ax.grid(True, alpha=0.3)
    _legend(ax, results, 8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_latency(path: Path, results: Sequence[LevelResult], context: str = "") -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    metrics: tuple[tuple[Any, Callable[[LevelResult], Distribution], str], ...] = (
        (axes[0], lambda r: r.summary.ttft_s, "Time to first token"),
        (axes[1], lambda r: r.summary.tpot_s, "Time per output token"),
    )
    for ax, metric, title in metrics:
        drawn: list[float] = []
        for target, rows in _by_target(results).items():
            for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                value, count = _percentile_of(metric, q)
                drawn += _series(ax, rows, value, count, f"{target} {q}", marker="o", linestyle=style)
        level_axis(ax, results)
        ax.set_ylabel("milliseconds")
        readable_log(ax, "y", drawn)
        _title(ax, title, context)
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax, results)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _percentile_of(
    metric: Callable[[LevelResult], Distribution], q: str
) -> tuple[Callable[[LevelResult], float | None], Callable[[LevelResult], int]]:
    """A level's percentile `q` of `metric` in milliseconds, and its sample count."""

    def value(r: LevelResult) -> float | None:
        v = getattr(metric(r), q)
        return None if v is None else float(v) * 1000

    return value, lambda r: metric(r).count


def plot_cdf(path: Path, results: Sequence[LevelResult], context: str = "") -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    drawn: tuple[list[float], list[float]] = ([], [])
    for r in results:
        measured = [x for x in r.records if x.ok and r.window.holds(x.scheduled or x.start)]
        late: Callable[[RequestRecord], float] = (lambda x: x.late) if r.level.rate is not None else (lambda x: 0.0)
        series = (
            sorted(x.ttft + late(x) for x in measured if x.ttft is not None),
            sorted(x.e2e + late(x) for x in measured if x.e2e is not None),
        )
        for ax, values, seen in zip(axes, series, drawn, strict=True):
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=f"{r.target} @ {r.level.value:g} (n={len(values)})")
                seen += values
    for ax, title, seen in zip(axes, ("TTFT CDF", "End-to-end latency CDF"), drawn, strict=True):
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        readable_log(ax, "x", seen)
        _title(ax, title, context)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_all(folder: Path, results: Sequence[LevelResult], context: str = "") -> None:
    plot_throughput(folder / "throughput.png", results, context)
    plot_latency(folder / "latency.png", results, context)
    plot_cdf(folder / "latency_cdf.png", results, context)
