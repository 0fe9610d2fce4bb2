"""The result folder: summary.json, requests.csv, PNG plots and report.md (refused numbers are never shown)."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.runner import LevelResult

# Share of all CPUs busy while the benchmark itself was idle, above which a run is flagged as disturbed.
BUSY_MACHINE = 0.25
FILES = ("summary.json", "requests.csv", "report.md", "throughput.png", "latency.png", "latency_cdf.png")
CSV_FIELDS = (
    "target",
    "level",
    "id",
    "scenario",
    "stream",
    "measured",
    "start",
    "scheduled",
    "late_s",
    "status",
    "ok",
    "cancelled",
    "error",
    "ttft_s",
    "tpot_s",
    "itl_mean_s",
    "itl_max_s",
    "e2e_s",
    "content_events",
    "prompt_tokens",
    "completion_tokens",
    "max_tokens",
)


def result_json(result: LevelResult) -> dict[str, Any]:
    level = {"users": result.level.users, "rate": result.level.rate}
    head = {
        "target": result.target,
        "level": level,
        "valid": result.valid,
        "problems": result.problems,
        "failures": result.failures,
        "window": {"t0": result.window.t0, "t1": result.window.t1},
        "loadgen": result.loadgen,
    }
    if result.valid:
        return {**head, **result.summary}
    # Numbers that cannot be true stay out of the results; they are kept apart for whoever debugs the run.
    return {**head, "unverified": result.summary}


def ratios(results: Sequence[LevelResult], pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, float | None]]:
    """Output tok/s of one target over another's, per level label (None when either run was refused)."""
    by_key = {(r.target, r.level.label): r for r in results}
    labels = list(dict.fromkeys(r.level.label for r in results))
    out: dict[str, dict[str, float | None]] = {}
    for top, bottom in pairs:
        row: dict[str, float | None] = {}
        for label in labels:
            a, b = by_key.get((top, label)), by_key.get((bottom, label))
            if a is None or b is None:
                continue
            ok = a.valid and b.valid and b.summary["output_tok_s"] > 0
            row[label] = a.summary["output_tok_s"] / b.summary["output_tok_s"] if ok else None
        if row:
            out[f"{top}/{bottom}"] = row
    return out


def write_csv(path: Path, results: Sequence[LevelResult]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for result in results:
            for r in result.records:
                itls = r.itls
                writer.writerow(
                    {
                        "target": result.target,
                        "level": result.level.label,
                        "id": r.id,
                        "scenario": r.scenario,
                        "stream": int(r.stream),
                        "measured": int(result.window.holds(r.scheduled if r.scheduled is not None else r.start)),
                        "start": f"{r.start:.6f}",
                        "scheduled": "" if r.scheduled is None else f"{r.scheduled:.6f}",
                        "late_s": f"{r.late:.6f}",
                        "status": r.status,
                        "ok": int(r.ok),
                        "cancelled": int(r.cancelled),
                        "error": r.error or "",
                        "ttft_s": _num(r.ttft),
                        "tpot_s": _num(r.tpot),
                        "itl_mean_s": _num(sum(itls) / len(itls) if itls else None),
                        "itl_max_s": _num(max(itls) if itls else None),
                        "e2e_s": _num(r.e2e),
                        "content_events": len(r.chunk_times),
                        "prompt_tokens": "" if r.prompt_tokens is None else r.prompt_tokens,
                        "completion_tokens": "" if r.completion_tokens is None else r.completion_tokens,
                        "max_tokens": r.max_tokens,
                    }
                )


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def markdown(meta: dict[str, Any], results: Sequence[LevelResult], ratio_table: dict[str, Any]) -> str:
    open_loop = any(r.level.rate is not None for r in results)
    level_name = "rate (req/s)" if open_loop else "users"
    lines = [
        f"# Load test: {meta.get('title', 'llmserve bench')}",
        "",
        f"- when: {meta['created']}",
        f"- command: `{meta.get('command', '')}`",
        f"- scenario: {meta['config']['scenario']}, seed {meta['config']['seed']}, arrival {meta['config']['arrival']}",
        f"- warm-up {meta['config']['warmup']:g} s excluded, measured {meta['config']['duration']:g} s per level",
        "- tokens come from the server's usage; throughput counts tokens produced inside the measured window",
        "",
        f"| target | {level_name} | output tok/s | total tok/s | req/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) "
        "| ITL p50 / p99 (ms) | e2e p50 / p99 (s) | ok / failed | goodput req/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        label = f"{r.level.value:g}"
        if not r.valid:
            lines.append(f"| {r.target} | {label} | refused: see below | | | | | | | | |")
            continue
        s = r.summary
        lines.append(
            f"| {r.target} | {label} | {_fmt(s['output_tok_s'])} | {_fmt(s['total_tok_s'])} "
            f"| {_fmt(s['requests_s'], digits=2)} "
            f"| {_fmt(s['ttft_s']['p50'], 1000, 0)} / {_fmt(s['ttft_s']['p99'], 1000, 0)} "
            f"| {_fmt(s['tpot_s']['p50'], 1000, 1)} / {_fmt(s['tpot_s']['p99'], 1000, 1)} "
            f"| {_fmt(s['itl_s']['p50'], 1000, 1)} / {_fmt(s['itl_s']['p99'], 1000, 1)} "
            f"| {_fmt(s['e2e_s']['p50'], digits=2)} / {_fmt(s['e2e_s']['p99'], digits=2)} "
            f"| {s['requests']['ok']} / {s['requests']['failed']} | {_fmt(s['goodput']['requests_s'], digits=2)} |"
        )
    if ratio_table:
        labels = sorted({label for row in ratio_table.values() for label in row}, key=_level_key)
        lines += ["", "Output tok/s ratios:", "", "| ratio | " + " | ".join(labels) + " |"]
        lines.append("|---|" + "---|" * len(labels))
        for name, row in ratio_table.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row.get(label), digits=2) for label in labels) + " |")
    notes = [f"- {r.target} at {r.level.value:g}: {p}" for r in results for p in (*r.problems, *r.failures) if p]
    unfinished = [r for r in results if r.summary["requests"]["cancelled_at_stop"]]
    notes += [
        f"- {r.target} at {r.level.value:g}: {r.summary['requests']['cancelled_at_stop']} requests sent inside the "
        "window were still running at the stop timeout; latencies cover only the ones that finished"
        for r in unfinished
    ]
    busy_machine = [r for r in results if (r.loadgen.get("machine_busy_before") or 0) > BUSY_MACHINE]
    notes += [
        f"- {r.target} at {r.level.value:g}: other work kept {r.loadgen['machine_busy_before']:.0%} of the CPUs busy "
        "just before this run; it likely disturbed these numbers"
        for r in busy_machine
    ]
    cut = [r for r in results if r.summary["requests"]["cancelled_with_tokens_in_window"]]
    notes += [
        f"- {r.target} at {r.level.value:g}: {r.summary['requests']['cancelled_with_tokens_in_window']} requests "
        "outlived the stop timeout with tokens inside the window; output tok/s undercounts them (raise --stop-timeout)"
        for r in cut
    ]
    late = [r for r in results if r.summary["requests"]["late"]]
    notes += [f"- {r.target} at {r.level.value:g}: {r.summary['requests']['late']} requests sent late" for r in late]
    busy = [r for r in results if r.loadgen["cpu_fraction"] > 0.8]
    notes += [
        f"- {r.target} at {r.level.value:g}: the load generator used {r.loadgen['cpu_fraction']:.0%} of a core"
        for r in busy
    ]
    if notes:
        lines += ["", "Problems and failed criteria:", "", *notes]
    lines += ["", "![output tokens/s](throughput.png)", "", "![latency](latency.png)", "", "![CDF](latency_cdf.png)"]
    return "\n".join(lines) + "\n"


def _level_key(label: str) -> float:
    return float(label[1:])


def write(
    folder: Path, meta: dict[str, Any], results: Sequence[LevelResult], pairs: Sequence[tuple[str, str]] = ()
) -> Path:
    """Write the whole result folder and return it."""
    from loadtests.plots import plot_all

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta}
    ratio_table = ratios(results, pairs)
    summary = {
        **meta,
        "results": [result_json(r) for r in results],
        "ratios": ratio_table,
        "refused": sum(1 for r in results if not r.valid),
        "failed_criteria": sum(len(r.failures) for r in results),
    }
    (folder / "summary.json").write_text(json.dumps(finite(summary), indent=2, allow_nan=False))
    write_csv(folder / "requests.csv", results)
    plot_all(folder, [r for r in results if r.valid])
    (folder / "report.md").write_text(markdown(meta, results, ratio_table))
    return folder


def finite(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers and readers choke on them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
