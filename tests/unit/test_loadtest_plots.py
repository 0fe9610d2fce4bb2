"""Plots of the load tests: a number on every axis whatever its range, log axes of a decade or less included."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from loadtests.plots import log_ticks, number, readable_log  # noqa: E402

RANGES = [
    (0.0505, 0.0616),  # a fifth of a decade, no power of ten or round 1-2-5 number inside
    (110.0, 140.0),
    (1.1, 1.3),
    (28.0, 92.0),  # one decade, no power of ten inside
    (113.0, 1127.0),
    (0.05, 30.0),
    (0.001, 1000.0),
]


@pytest.mark.parametrize(("low", "high"), RANGES)
def test_every_range_gets_several_labelled_ticks(low: float, high: float) -> None:
    ticks = log_ticks(low, high)
    assert len(ticks) >= 3, ticks
    assert all(low <= t <= high for t in ticks) and ticks == sorted(ticks)
    assert all("e" not in number(t) for t in ticks)


@pytest.mark.parametrize(("low", "high"), RANGES)
def test_a_drawn_log_axis_shows_the_numbers(low: float, high: float) -> None:
    fig, ax = plt.subplots()
    values = [low, (low * high) ** 0.5, high]
    ax.plot([1, 2, 3], values)
    readable_log(ax, "y", values)
    fig.canvas.draw()
    bottom, top = ax.get_ylim()
    # Only labels inside the axis count: matplotlib also keeps the ticks beyond its ends.
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and bottom <= t.get_position()[1] <= top]
    plt.close(fig)
    assert ax.get_yscale() == "log"
    assert len(labels) >= 3, labels


def test_numbers_are_plain() -> None:
    assert [number(v) for v in (0.05, 1.0, 250.0, 1500.0, 20000.0)] == ["0.05", "1", "250", "1,500", "20,000"]
