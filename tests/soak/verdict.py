"""Reading the soak's evidence: access log and logs by request id, 5xx against the fault windows, canaries in logs."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.soak.faults import Window
from tests.soak.sampler import Sample

# Failures the load itself explains at any time: its own hang-ups (the 10% of streams it cancels, and whatever
# Locust's stop cuts off at the end).
LOAD_REASONS = frozenset({"client_disconnected"})

# What the gateway logs for a request that failed, by the reason it names (the first match wins).
LOG_REASONS = (
    ("limits backend unavailable", "limits_unavailable"),
    ("unreachable", "connect_error"),
    ("engine stream broke", "upstream_broken_midstream"),
    ("unexpected error", "internal_error"),
)
LOG_LINE = re.compile(r"^\S+ \S+ (\w+) (\S+) \[([^\]]+)\] (.*)$")
TRACEBACK = "Traceback (most recent call last)"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def log_time(stamp: str) -> float:
    """logging's default asctime ("2024-05-01 12:00:00,123", local time) as epoch seconds."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def messages_by_request(log: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = LOG_LINE.match(line)
        if m and m.group(3) != "-":
            found.setdefault(m.group(3), []).append(m.group(4))
    return found


def reason_of(status: int, messages: list[str]) -> str:
    for message in messages:
        for needle, reason in LOG_REASONS:
            if needle in message:
                return reason
    return f"http_{status}"


# A limiter refusal after Redis was back: a pooled connection the restart broke, taken only now. Its own bucket, so
# that the test for that defect can be marked apart from the one for failures no fault explains.
LATE_REDIS = "redis_restarted_late"


def window_of(windows: list[Window], t0: float, t1: float, code: str | None = None) -> str | None:
    found = next((w.kind for w in windows if w.covers(t0, t1)), None)
    if found is None and code == "limits_unavailable":
        restarted = any(w.kind == "redis_restarted" and w.back is not None and w.back <= t0 for w in windows)
        return LATE_REDIS if restarted else None
    return found


@dataclass
class ServerErrors:
    """The gateway's 5xx answers (access log), each with a reason (its log lines) and the fault that explains it."""

    by_fault: dict[str, dict[str, int]] = field(default_factory=dict)
    unexplained: list[dict[str, Any]] = field(default_factory=list)


def server_errors(access: list[dict[str, Any]], log: Path, windows: list[Window]) -> ServerErrors:
    messages = messages_by_request(log)
    out = ServerErrors()
    for line in access:
        status = line.get("status")
        if not isinstance(status, int) or status < 500:
            continue
        end = log_time(line["ts"])
        start = end - float(line.get("duration_s") or 0.0)
        reason = reason_of(status, messages.get(line.get("request_id", ""), []))
        fault = window_of(windows, start, end, reason)
        if fault is None:
            out.unexplained.append({"request_id": line.get("request_id"), "status": status, "reason": reason})
        else:
            bucket = out.by_fault.setdefault(fault, {})
            bucket[reason] = bucket.get(reason, 0) + 1
    return out


def error_reasons(first: Sample, last: Sample) -> dict[str, int]:
    """gateway_errors_total by reason over the run."""
    reasons = set(first.errors) | set(last.errors)
    deltas = {r: int(last.errors.get(r, 0) - first.errors.get(r, 0)) for r in sorted(reasons)}
    return {r: n for r, n in deltas.items() if n}


def errors_outside(samples: list[Sample], windows: list[Window]) -> list[dict[str, Any]]:
    """Increments of gateway_errors_total, between two samples, that no fault and nothing the load does explains.

    An increment happened between the start of the sample before and the moment the later one's /metrics answer came:
    a fault that began while that sample was being taken explains it.
    """
    found = []
    for before, after in zip(samples, samples[1:], strict=False):
        if not before.errors or not after.errors:
            continue
        end = after.metrics_t if after.metrics_t is not None else after.t
        for reason, value in after.errors.items():
            delta = value - before.errors.get(reason, 0.0)
            if delta > 0 and reason not in LOAD_REASONS and window_of(windows, before.t, end, reason) is None:
                found.append({"t": round(after.t, 1), "reason": reason, "count": int(delta)})
    return found


# What the client saw that only a fault explains: a 5xx, an SSE error event, a broken or truncated answer.
def client_failure(outcome: str) -> bool:
    if outcome.startswith("status:"):
        return int(outcome.split(":", 1)[1]) >= 500
    return outcome.startswith(("stream_error:", "broken:", "truncated", "bad_body"))


@dataclass
class ClientView:
    outcomes: dict[str, int]
    by_fault: dict[str, dict[str, int]]
    unexplained: list[dict[str, Any]]
    done: int


def client_view(records: list[dict[str, Any]], windows: list[Window]) -> ClientView:
    outcomes = Counter(f"{r['user']}:{r['outcome']}" for r in records)
    by_fault: dict[str, dict[str, int]] = {}
    unexplained = []
    for r in records:
        if not client_failure(r["outcome"]):
            continue
        fault = window_of(windows, r["t0"], r["t1"], r.get("code"))
        if fault is None:
            unexplained.append({k: r.get(k) for k in ("t0", "t1", "user", "route", "outcome", "code")})
        else:
            what = f"{r['outcome']}:{r['code']}" if r.get("code") else r["outcome"]
            bucket = by_fault.setdefault(fault, {})
            bucket[what] = bucket.get(what, 0) + 1
    done = sum(1 for r in records if r["outcome"] == "ok")
    return ClientView(dict(sorted(outcomes.items())), by_fault, unexplained, done)


def canary_hits(files: Iterable[Path], needles: dict[str, str]) -> dict[str, list[str]]:
    """For each file that holds any needle, the names of the needles it holds (never the needles themselves)."""
    hits: dict[str, list[str]] = {}
    wanted = {name: value.encode() for name, value in needles.items() if value}
    for path in files:
        if not path.is_file():
            continue
        data = path.read_bytes()
        found = [name for name, value in wanted.items() if value in data]
        if found:
            hits[str(path)] = found
    return hits


def tracebacks(path: Path) -> list[str]:
    """The first lines of each traceback a log holds (exception type at the end of it, without the frames)."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    found = []
    for i, line in enumerate(lines):
        if TRACEBACK in line:
            end = i + 1
            while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
                end += 1
            head = lines[max(0, i - 1)]
            found.append(f"{head} ... {lines[end] if end < len(lines) else ''}"[:300])
    return found
