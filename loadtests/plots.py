"""PNG plots of a run: tokens/s and latency percentiles against load, and latency CDFs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullFormatter  # noqa: E402

from loadtests.runner import LevelResult  # noqa: E402


def _by_target(results: Sequence[LevelResult]) -> dict[str, list[LevelResult]]:
    out: dict[str, list[LevelResult]] = {}
    for r in results:
        out.setdefault(r.target, []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r.level.value)
    return out


def _plain_log(axis: object) -> None:
    """Log scale with plain numbers and no labels on the minor ticks (they overlap on short ranges)."""
    axis.set_major_formatter(FormatStrFormatter("%g"))  # type: ignore[attr-defined]
    axis.set_minor_formatter(NullFormatter())  # type: ignore[attr-defined]


def _xlabel(results: Sequence[LevelResult]) -> str:
    return "arrival rate (requests/s)" if any(r.level.rate is not None for r in results) else "concurrent users"


def plot_throughput(path: Path, results: Sequence[LevelResult]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for target, rows in _by_target(results).items():
        xs = [r.level.value for r in rows]
        ax.plot(xs, [r.summary["output_tok_s"] for r in rows], marker="o", label=f"{target} output")
        ax.plot(xs, [r.summary["total_tok_s"] for r in rows], marker=".", linestyle=":", label=f"{target} total")
    ax.set_xlabel(_xlabel(results))
    ax.set_ylabel("tokens/s")
    ax.set_title("Throughput (tokens from server usage)")
    ax.grid(True, alpha=0.3)
    if results:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(path: Path, results: Sequence[LevelResult]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric, title in ((axes[0], "ttft_s", "Time to first token"), (axes[1], "tpot_s", "Time per output token")):
        for target, rows in _by_target(results).items():
            xs = [r.level.value for r in rows]
            for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                ys = [r.summary[metric][q] for r in rows]
                points = [(x, y * 1000) for x, y in zip(xs, ys, strict=True) if y is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", linestyle=style, label=f"{target} {q}")
        ax.set_xlabel(_xlabel(results))
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cdf(path: Path, results: Sequence[LevelResult]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in results:
        measured = [x for x in r.records if x.ok and r.window.holds(x.scheduled or x.start)]
        late = (lambda x: x.late) if r.level.rate is not None else (lambda x: 0.0)
        series = (
            sorted(x.ttft + late(x) for x in measured if x.ttft is not None),
            sorted(x.e2e + late(x) for x in measured if x.e2e is not None),
        )
        for ax, values in zip(axes, series, strict=True):
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=f"{r.target} @ {r.level.value:g}")
    for ax, title in zip(axes, ("TTFT", "End-to-end latency"), strict=True):
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.set_xscale("log")
        _plain_log(ax.xaxis)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(folder: Path, results: Sequence[LevelResult]) -> None:
    plot_throughput(folder / "throughput.png", results)
    plot_latency(folder / "latency.png", results)
    plot_cdf(folder / "latency_cdf.png", results)
