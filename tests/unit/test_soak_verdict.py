"""The soak's reading of gateway_errors_total against its fault windows."""

from __future__ import annotations

from tests.soak.faults import GRACE, Window
from tests.soak.sampler import Sample
from tests.soak.verdict import errors_outside

KILLED_AT = 1000.0


def engine_window() -> list[Window]:
    return [Window("engine_killed", KILLED_AT, back=KILLED_AT + 50)]


def test_errors_counted_by_a_sample_that_began_just_before_the_fault_are_the_faults() -> None:
    # The later sample began 0.1 s before the kill; its /metrics answer came 0.3 s after it, with the kill's errors.
    before = Sample(t=KILLED_AT - 1.1, metrics_t=KILLED_AT - 0.8, errors={"client_disconnected": 2.0})
    after = Sample(
        t=KILLED_AT - 0.1,
        metrics_t=KILLED_AT + 0.3,
        errors={"client_disconnected": 2.0, "upstream_broken": 3.0, "no_healthy_endpoint": 7.0},
    )
    assert errors_outside([before, after], engine_window()) == []


def test_errors_no_fault_explains_are_named() -> None:
    at = KILLED_AT + 50 + GRACE + 30
    before = Sample(t=at, metrics_t=at + 0.2, errors={"upstream_broken": 3.0})
    after = Sample(t=at + 1, metrics_t=at + 1.2, errors={"upstream_broken": 4.0, "client_disconnected": 5.0})
    assert errors_outside([before, after], engine_window()) == [{"t": at + 1, "reason": "upstream_broken", "count": 1}]


def test_a_sample_without_the_gateway_counters_is_no_evidence() -> None:
    at = KILLED_AT + 200
    before = Sample(t=at)  # /metrics did not answer
    after = Sample(t=at + 1, metrics_t=at + 1.1, errors={"upstream_broken": 4.0})
    assert errors_outside([before, after], engine_window()) == []
