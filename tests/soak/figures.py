"""The soak's figures: what one run measured, as written to soak.json and summed up in a few lines."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from tests.soak.sampler import Sample


@dataclass
class Figures:
    """What the soak measured, as written to soak.json."""

    duration_s: float
    warmup_s: float
    users: dict[str, int]
    max_num_seqs: int
    wall_s: float = 0.0
    load_s: float = 0.0
    locust_exit: int | None = None
    requests_sent: int = 0
    requests_done: int = 0
    # Requests answered in full that were sent after the last fault was over: the stack serves again.
    served_after_faults: int = 0
    rss_baseline_mib: float | None = None
    rss_start_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_end_mib: float | None = None
    rss_growth_mib: float | None = None
    fds_baseline: int | None = None
    fds_peak: int | None = None
    fds_end: int | None = None
    conns_baseline: dict[str, int] = field(default_factory=dict)
    conns_end: dict[str, int] = field(default_factory=dict)
    fd_kinds_baseline: dict[str, int] = field(default_factory=dict)
    fd_kinds_end: dict[str, int] = field(default_factory=dict)
    series_baseline: int | None = None
    series_peak: int | None = None
    series_end: int | None = None
    inflight_peak: float | None = None
    engine_running_peak: float | None = None
    engine_waiting_peak: float | None = None
    queue_depth_peak: float | None = None
    # Seconds from the end of the load until no request was in flight; None: never within a minute.
    idle_after_s: float | None = None
    # Seconds after that until what was still held let go; None when nothing was held or it never let go.
    released_late_after_s: float | None = None
    final: dict[str, Any] = field(default_factory=dict)
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    server_5xx_by_fault: dict[str, dict[str, int]] = field(default_factory=dict)
    server_5xx_unexplained: list[dict[str, Any]] = field(default_factory=list)
    errors_outside_faults: list[dict[str, Any]] = field(default_factory=list)
    client_outcomes: dict[str, int] = field(default_factory=dict)
    client_failures_by_fault: dict[str, dict[str, int]] = field(default_factory=dict)
    client_failures_unexplained: list[dict[str, Any]] = field(default_factory=list)
    canary_hits: dict[str, list[str]] = field(default_factory=dict)
    gateway_tracebacks: list[str] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    key_rounds: list[dict[str, Any]] = field(default_factory=list)
    keys_reloads_logged: int = 0
    gateway_exit: int | None = None
    fault_error: str | None = None

    def summary(self) -> str:
        lines = [
            f"soak: {self.load_s:.0f} s of load ({self.duration_s:.0f} planned, {self.warmup_s:.0f} s warm-up), "
            f"users {self.users}, engine max_num_seqs {self.max_num_seqs}, wall {self.wall_s:.0f} s",
            f"  requests: {self.requests_sent} sent, {self.requests_done} answered in full "
            f"({self.served_after_faults} sent after the faults were over)",
            f"  gateway RSS MiB: baseline {self.rss_baseline_mib}, after warm-up {self.rss_start_mib}, "
            f"peak {self.rss_peak_mib}, end {self.rss_end_mib} (growth {self.rss_growth_mib})",
            f"  gateway fds: baseline {self.fds_baseline}, peak {self.fds_peak}, end {self.fds_end}; "
            f"kinds {self.fd_kinds_baseline} -> {self.fd_kinds_end}; "
            f"connections {self.conns_baseline} -> {self.conns_end}",
            f"  /metrics series: baseline {self.series_baseline}, peak {self.series_peak}, end {self.series_end}",
            f"  in flight: gateway peak {self.inflight_peak}, queued peak {self.queue_depth_peak}, engine running "
            f"peak {self.engine_running_peak}, waiting peak {self.engine_waiting_peak}",
            f"  at rest ({self.idle_after_s} s after the load): {self.final}; what was still held let go "
            f"{self.released_late_after_s} s later",
            f"  gateway_errors_total by reason: {self.errors_by_reason}",
            f"  5xx by fault and reason: {self.server_5xx_by_fault}; unexplained: {len(self.server_5xx_unexplained)}",
            f"  faults: {self.faults}",
            f"  keys rewrites: {len(self.key_rounds)}, reloads logged {self.keys_reloads_logged}",
            f"  canaries found in logs: {self.canary_hits or 'none'}",
        ]
        return "\n".join(lines)


def mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def median_rss(samples: list[Sample], start: float, end: float) -> int | None:
    values = [s.rss for s in samples if start <= s.t <= end and s.rss is not None]
    return int(statistics.median(values)) if values else None
