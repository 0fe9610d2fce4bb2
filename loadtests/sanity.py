"""Refusing impossible numbers (buffered streams, TTFT = e2e, tokens/s beyond the hardware) and CI thresholds."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from loadtests.accounting import RequestRecord
from loadtests.stats import Summary, percentile

# Below this median gap between content events, tokens are not streamed one by one: something buffers.
MIN_PLAUSIBLE_ITL_S = 1e-4
# A streamed request whose first token arrives this close to its end was delivered in one piece.
TTFT_EQUALS_E2E_S = 1e-3


def default_ceiling(device: str, world_size: int = 1) -> float:
    """Output tokens/s that no run on this hardware can exceed, used when the user gives none.

    Deliberately generous (it catches counting bugs, not slow servers): 1,000 tokens/s per CPU core, 100,000 per GPU.
    """
    if device == "cpu":
        return 1000.0 * (os.cpu_count() or 1)
    return 100_000.0 * max(1, world_size)


@dataclass(frozen=True)
class Thresholds:
    """Failure criteria for CI: breaking one makes `llmserve bench` exit non-zero."""

    max_error_rate: float | None = None
    max_p99_ttft: float | None = None
    min_output_tok_s: float | None = None


def impossible(summary: Summary, records: Sequence[RequestRecord], ceiling: float | None) -> list[str]:
    """Reasons these numbers cannot be true; any reason means the run is not reported as a result."""
    problems: list[str] = []
    streamed = [r for r in records if r.ok and r.stream]
    gaps = [gap for r in streamed for gap in r.itls]
    if len(gaps) >= 10 and percentile(gaps, 50) < MIN_PLAUSIBLE_ITL_S:
        problems.append(
            f"median inter-token latency is {percentile(gaps, 50) * 1e6:.0f} us: the stream arrives in bunches "
            "(a buffering proxy or client), so TTFT and ITL are not what a user sees"
        )
    multi = [r for r in streamed if (r.completion_tokens or 0) >= 2 and r.ttft is not None and r.e2e is not None]
    whole = [r for r in multi if r.e2e is not None and r.ttft is not None and r.e2e - r.ttft < TTFT_EQUALS_E2E_S]
    if multi and len(whole) > len(multi) / 2:
        problems.append(
            f"{len(whole)} of {len(multi)} streamed requests got their first token at the very end: TTFT equals "
            "end-to-end latency, the answer was not streamed"
        )
    rate = summary.output_tok_s
    if ceiling is not None and rate > ceiling:
        problems.append(f"{rate:.0f} output tokens/s is above the {ceiling:.0f} this hardware can produce")
    over = [r for r in records if r.ok and (r.completion_tokens or 0) > r.max_tokens]
    if over:
        problems.append(f"{len(over)} requests report more output tokens than max_tokens allowed: usage is wrong")
    fewer = [r for r in streamed if len(r.chunk_times) > (r.completion_tokens or 0)]
    if fewer:
        problems.append(f"{len(fewer)} requests streamed more text events than their usage counts tokens")
    backwards = [r for r in records if r.ok and r.ttft is not None and r.e2e is not None and r.ttft > r.e2e]
    if backwards:
        problems.append(f"{len(backwards)} requests have a first token after their end")
    return problems


def broken_thresholds(summary: Summary, thresholds: Thresholds) -> list[str]:
    """Which CI criteria this run breaks (empty: it passes)."""
    out: list[str] = []
    requests = summary.requests
    if requests.started == 0:
        out.append("no request was sent inside the measured window (window too short?)")
    if thresholds.max_error_rate is not None and requests.error_rate > thresholds.max_error_rate:
        out.append(f"error rate {requests.error_rate:.3f} > {thresholds.max_error_rate}")
    p99 = summary.ttft_s.p99
    if thresholds.max_p99_ttft is not None and p99 is not None and p99 > thresholds.max_p99_ttft:
        out.append(f"p99 TTFT {p99:.3f}s > {thresholds.max_p99_ttft}s")
    rate = summary.output_tok_s
    if thresholds.min_output_tok_s is not None and not rate >= thresholds.min_output_tok_s:
        out.append(f"output tokens/s {rate:.1f} < {thresholds.min_output_tok_s}")
    return out
