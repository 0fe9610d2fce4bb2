"""Percentiles, windowed throughput, goodput and the sanity checks of the load tests, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtests.accounting import RequestRecord
from loadtests.sanity import Thresholds, broken_thresholds, impossible
from loadtests.stats import SLO, Distribution, Window, percentile, summarize


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [10.0, 1.0, 4.0, 3.0, 2.0]  # sorted: 1 2 3 4 10
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(7.6)  # rank 3.6: 4 + 0.6 * (10 - 4)
    assert percentile(values, 99) == pytest.approx(9.76)  # rank 3.96: 4 + 0.96 * 6
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 10.0
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    for q in (1, 25, 50, 75, 90, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_distribution_of_nothing_is_null_not_nan() -> None:
    assert Distribution.of([]) == Distribution(count=0, mean=None, p50=None, p90=None, p99=None, max=None)
    d = Distribution.of([1.0, 2.0, 3.0, 4.0, 10.0])
    assert d.count == 5 and d.mean == 4.0 and d.max == 10.0 and d.p50 == 3.0


def streamed(
    rid: int, start: float, times: list[float], tokens: int, prompt: int = 10, **fields: object
) -> RequestRecord:
    return RequestRecord(
        id=rid,
        scenario="chat",
        stream=True,
        start=start,
        max_tokens=64,
        status=200,
        ttft=times[0],
        e2e=times[-1],
        chunk_times=times,
        prompt_tokens=prompt,
        completion_tokens=tokens,
        **fields,  # type: ignore[arg-type]
    )


# Window [10, 20). Request 1 started in the warm-up, its last 2 of 4 events fall inside; request 2 lies wholly
# inside; request 3 failed inside; request 4 started inside and was cancelled at the stop.
RECORDS = [
    streamed(1, 5.0, [1.0, 4.0, 6.0, 8.0], tokens=8),  # events at 6, 9, 11, 13 -> 2 x 2 tokens inside
    streamed(2, 12.0, [0.5, 1.0, 1.5, 2.0, 2.5], tokens=5),  # TTFT 0.5, TPOT (2.5 - 0.5) / 4 = 0.5
    RequestRecord(id=3, scenario="chat", stream=True, start=15.0, max_tokens=64, status=503, error="HTTP 503", e2e=0.1),
    RequestRecord(id=4, scenario="chat", stream=True, start=19.0, max_tokens=64, cancelled=True, e2e=3.0),
]


def test_summary_counts_tokens_inside_the_window_and_requests_started_in_it() -> None:
    s = summarize(RECORDS, Window(10.0, 20.0), SLO(ttft=1.0, tpot=0.4))
    assert s.window_s == 10.0
    # Output: 4 (request 1) + 5 (request 2) = 9 tokens in 10 s. Prompt: request 2's 10 (its first token at 12.5).
    assert s.output_tok_s == pytest.approx(0.9)
    assert s.prompt_tok_s == pytest.approx(1.0)
    assert s.total_tok_s == pytest.approx(1.9)
    # Requests 1 (ends at 13) and 2 (ends at 14.5) finished inside.
    assert s.requests_s == pytest.approx(0.2)
    req = s.requests
    assert (req.measured, req.ok, req.failed, req.cancelled_at_stop) == (2, 1, 1, 1)
    assert req.cancelled_with_tokens_in_window == 0
    assert req.error_rate == 0.5
    assert s.errors == {"HTTP 503": 1}
    assert s.ttft_s.p50 == 0.5 and s.tpot_s.p50 == pytest.approx(0.5)
    assert s.itl_s.count == 4 and s.itl_s.p50 == pytest.approx(0.5)
    # Request 2 meets the TTFT objective but not TPOT <= 0.4: no goodput.
    assert s.goodput.requests_s == 0.0 and s.goodput.fraction == 0.0
    relaxed = summarize(RECORDS, Window(10.0, 20.0), SLO(ttft=1.0, tpot=0.5))
    assert relaxed.goodput.requests_s == pytest.approx(0.1)
    assert relaxed.goodput.output_tok_s == pytest.approx(0.5)


def test_requests_cut_off_at_the_stop_are_reported() -> None:
    cut = RequestRecord(
        id=5, scenario="chat", stream=True, start=18.0, max_tokens=64, cancelled=True, chunk_times=[1.0, 2.5, 3.0]
    )
    s = summarize([*RECORDS, cut], Window(10.0, 20.0), SLO())
    assert s.requests.cancelled_with_tokens_in_window == 1  # its event at 19 lies inside
    assert s.output_tok_s == pytest.approx(0.9)  # and it adds nothing: it has no usage


def test_open_loop_latency_counts_from_the_due_time() -> None:
    late = streamed(1, 12.0, [0.5, 1.0], tokens=2, scheduled=11.0)
    on_time = streamed(2, 13.0, [0.5, 1.0], tokens=2, scheduled=13.0)
    s = summarize([late, on_time], Window(10.0, 20.0), SLO(), open_loop=True, late_tolerance=0.05)
    assert s.requests.late == 1
    assert s.ttft_s.max == pytest.approx(1.5)  # 1 s late + 0.5 s TTFT
    assert s.late_s.max == pytest.approx(1.0)


def healthy(n: int = 20) -> list[RequestRecord]:
    return [streamed(i, 10.0 + i, [0.2 + 0.03 * k for k in range(10)], tokens=10) for i in range(n)]


def test_healthy_numbers_pass_the_sanity_checks() -> None:
    records = healthy()
    s = summarize(records, Window(10.0, 40.0), SLO())
    assert impossible(s, records, ceiling=1000.0) == []
    assert broken_thresholds(s, Thresholds(max_error_rate=0.0, max_p99_ttft=1.0, min_output_tok_s=1.0)) == []


def test_buffered_stream_is_refused() -> None:
    # All tokens arrive at once (a buffering proxy): ITL is zero, TTFT equals e2e.
    records = [streamed(i, 10.0 + i, [1.0] * 10, tokens=10) for i in range(20)]
    problems = impossible(summarize(records, Window(10.0, 40.0), SLO()), records, ceiling=None)
    assert any("inter-token latency" in p for p in problems)
    assert any("TTFT equals" in p for p in problems)


def test_impossible_rates_and_counts_are_refused() -> None:
    records = healthy()
    s = summarize(records, Window(10.0, 40.0), SLO())
    assert any("above the 1" in p for p in impossible(s, records, ceiling=1.0))
    records[0].completion_tokens = 100  # more than max_tokens=64
    records[1].completion_tokens = 3  # fewer tokens than the 10 text events it streamed
    problems = impossible(s, records, ceiling=None)
    assert any("more output tokens than max_tokens" in p for p in problems)
    assert any("more text events than their usage" in p for p in problems)


def test_thresholds_turn_into_failures() -> None:
    s = summarize(RECORDS, Window(10.0, 20.0), SLO())
    broken = broken_thresholds(s, Thresholds(max_error_rate=0.01, max_p99_ttft=0.1, min_output_tok_s=5.0))
    assert len(broken) == 3
    assert broken_thresholds(summarize([], Window(0, 10), SLO()), Thresholds()) == [
        "no request was sent inside the measured window (window too short?)"
    ]
    # Requests sent but none finished (a saturated server): no latency to report, but nothing broken either.
    stuck = RequestRecord(id=9, scenario="chat", stream=True, start=12.0, max_tokens=64, cancelled=True, e2e=30.0)
    s = summarize([stuck], Window(10.0, 20.0), SLO())
    assert (s.requests.started, s.requests.measured, s.requests.cancelled_at_stop) == (1, 0, 1)
    assert broken_thresholds(s, Thresholds(max_error_rate=0.0)) == []
