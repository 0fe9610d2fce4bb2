"""The result folder: summary.json, requests.csv, PNG plots and report.md (refused numbers are never shown)."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtests.config import LoadConfig, QualityConfig, report_lines
from loadtests.numbers import fmt, percentiles
from loadtests.quality import QualityResult, quality_failures, table
from loadtests.runner import LevelResult
from loadtests.stats import MIN_SAMPLES

Quality = Sequence[QualityResult]

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
    "output_events",
    "prompt_tokens",
    "completion_tokens",
    "max_tokens",
)


@dataclass(frozen=True)
class Baseline:
    url: str | None
    dtype: str
    threads: int | None


@dataclass
class Meta:
    """What a result folder says about the run as a whole."""

    title: str
    command: str
    config: LoadConfig
    model: str
    sampling: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    baseline: Baseline | None = None
    quality: QualityConfig = field(default_factory=QualityConfig)
    # A tenants run: what each tenant was (loadtests/tenants.py, Tenant.describe), in the file's order.
    tenants: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = {**data["config"], "lengths": asdict(self.config.lengths)}
        return data


def result_json(result: LevelResult) -> dict[str, Any]:
    level = {"users": result.level.users, "rate": result.level.rate}
    head = {
        "target": result.target,
        "level": level,
        "valid": result.valid,
        "problems": result.problems,
        "failures": result.failures,
        "low_samples": not result.summary.samples.enough,
        "window": {"t0": result.window.t0, "t1": result.window.t1, "spans": [list(s) for s in result.window.spans]},
        "loadgen": asdict(result.loadgen),
        "engine_tok_s": result.engine_tok_s,
        "engine_problem": result.engine_problem,
        "gateway_cpu_s": result.gateway_cpu_s,
        "gateway_cpu_share": result.gateway_cpu_share,
        "gateway_cpu_problem": result.gateway_cpu_problem,
    }
    if result.valid:
        return {**head, **result.summary.to_json()}
    # Numbers that cannot be true stay out of the results; they are kept apart for whoever debugs the run.
    return {**head, "unverified": result.summary.to_json()}


# How a ratio row of the engines' own counts is named beside the client's row of the same pair.
ENGINE_ROW = " (engine's count)"


def ratios(results: Sequence[LevelResult], pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, float | None]]:
    """Output tok/s of one target over another's, per level label (None when either run was refused); where both
    targets' engine counters were read, a second row of the same pair from the engines' own counts."""
    by_key = {(r.target, r.level.label): r for r in results}
    labels = list(dict.fromkeys(r.level.label for r in results))
    out: dict[str, dict[str, float | None]] = {}
    for top, bottom in pairs:
        row: dict[str, float | None] = {}
        engine_row: dict[str, float | None] = {}
        for label in labels:
            a, b = by_key.get((top, label)), by_key.get((bottom, label))
            if a is None or b is None:
                continue
            ok = a.valid and b.valid and b.summary.output_tok_s > 0
            row[label] = a.summary.output_tok_s / b.summary.output_tok_s if ok else None
            ea, eb = a.engine_tok_s, b.engine_tok_s
            if ea is not None and eb is not None:
                engine_row[label] = ea / eb if ok and eb > 0 else None
        if row:
            out[f"{top}/{bottom}"] = row
        if engine_row:
            out[f"{top}/{bottom}{ENGINE_ROW}"] = engine_row
    return out


def ratio_errors(
    results: Sequence[LevelResult], table: dict[str, dict[str, float | None]]
) -> dict[str, dict[str, float | None]]:
    """The standard error of each client's ratio of `ratios`' table, from both targets' errors over their windows'
    quarters (the engines' rows have none: their counter is read at the windows' edges only)."""
    by_key = {(r.target, r.level.label): r for r in results}
    out: dict[str, dict[str, float | None]] = {}
    for name, row in table.items():
        if name.endswith(ENGINE_ROW):
            continue
        top, bottom = name.split("/", 1)
        errors: dict[str, float | None] = {}
        for label, ratio in row.items():
            a, b = by_key[(top, label)].summary, by_key[(bottom, label)].summary
            ra, rb = a.steadiness.relative, b.steadiness.relative
            errors[label] = None if ratio is None or ra is None or rb is None else ratio * math.hypot(ra, rb)
        out[name] = errors
    return out


def with_error(value: float | None, error: float | None, digits: int = 1) -> str:
    """A figure and its standard error, as `12.3 ± 1.2`."""
    if error is None or value is None:
        return fmt(value, digits=digits)
    return f"{fmt(value, digits=digits)} ± {fmt(error, digits=digits)}"


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
                        "output_events": len(r.chunk_times),
                        "prompt_tokens": "" if r.prompt_tokens is None else r.prompt_tokens,
                        "completion_tokens": "" if r.completion_tokens is None else r.completion_tokens,
                        "max_tokens": r.max_tokens,
                    }
                )


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def level_line(r: LevelResult, what: str = "") -> str:
    """One line for the terminal as a level (or a round of it: `what` names which) ends."""
    s = r.summary
    state = "ok" if r.valid else "REFUSED: " + "; ".join(r.problems)
    where = f"{r.target} at {r.level.label}" + (f" ({what})" if what else "")
    engine = f" (engine's count {fmt(r.engine_tok_s)})" if r.engine_tok_s is not None else ""
    if r.gateway_cpu_share is not None:
        engine += f", gateway CPU {r.gateway_cpu_share:.1%} of a core"
    line = (
        f"bench: {where}: {with_error(s.output_tok_s, s.steadiness.error)} output tok/s{engine}, "
        f"TTFT p50 {fmt(s.ttft_s.p50, 1000, 0)} ms, e2e p50 {fmt(s.e2e_s.p50, digits=2)} s "
        f"(n={s.samples.measured}), {s.requests.ok} ok / {s.requests.failed} failed ({state})"
    )
    for warning in (s.samples.advice(), s.steadiness.advice(), r.engine_problem or "", r.gateway_cpu_problem or ""):
        if warning:
            line += f"\nbench: WARNING {where}: {warning}"
    return line


def markdown(
    meta: Meta,
    results: Sequence[LevelResult],
    ratio_table: dict[str, Any],
    quality: Quality,
    error_table: dict[str, dict[str, float | None]] | None = None,
) -> str:
    open_loop = any(r.level.rate is not None for r in results)
    level_name = "rate (req/s)" if open_loop else "users"
    c = meta.config
    scores = {q.target: q.score for q in quality}
    lines = [
        f"# Load test: {meta.title}",
        "",
        f"- when: {meta.created}",
        f"- command: `{meta.command}`",
        f"- model: {meta.model}; sampling: {json.dumps(meta.sampling, sort_keys=True)}",
        "- " + ", ".join(report_lines(c)),
        "- tokens come from the server's usage; throughput counts tokens produced inside the measured window",
        "- every percentile shows the number of samples (n) it comes from; a level with fewer than "
        f"{MIN_SAMPLES} measured requests is marked *few samples*",
    ]
    if quality:
        lines.append(
            f"- quality: {quality[0].total} fixed questions asked greedily, up to {quality[0].max_tokens} tokens "
            "each; correct when the expected answer appears as a whole word in the reply"
        )
    if meta.tenants is not None:
        from loadtests.tenant_report import error_notes, tenant_lines

        lines += ["", *tenant_lines(meta.tenants, results)]
        notes = error_notes(results)
    else:
        lines += ["", *sweep_table(results, level_name, scores)]
        notes = []
    if ratio_table:
        labels = sorted({label for row in ratio_table.values() for label in row}, key=_level_key)
        lines += ["", "Output tok/s ratios:", "", "| ratio | " + " | ".join(labels) + " |"]
        lines.append("|---|" + "---|" * len(labels))
        errors = error_table or {}
        for name, row in ratio_table.items():
            cells = (with_error(row.get(label), errors.get(name, {}).get(label), digits=2) for label in labels)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "(± one standard error, from each target's output tok/s over the quarters of its window)"]
        if any(name.endswith(ENGINE_ROW) for name in ratio_table):
            lines += [
                "(engine's count: the tokens the engines' own counter, vllm:generation_tokens_total, grew by inside "
                "each target's window)"
            ]
    lines += gateway_cpu_table(results)
    notes = (
        notes_of(results)
        + notes
        + [f"- {failure}" for failure in quality_failures(quality, meta.quality.quality_tolerance)]
    )
    if notes:
        lines += ["", "Problems and failed criteria:", "", *notes]
    if quality:
        lines += ["", "Quality:", "", "```", table(quality), "```"]
    lines += ["", "![output tokens/s](throughput.png)", "", "![latency](latency.png)", "", "![CDF](latency_cdf.png)"]
    return "\n".join(lines) + "\n"


def gateway_cpu_table(results: Sequence[LevelResult]) -> list[str]:
    """The CPU the gateway's process spent inside its windows, per level: its cost on the machine it shares with
    the engine, which the machine's drift between runs does not move as it moves tok/s (empty: not read)."""
    read = [r for r in results if r.gateway_cpu_s is not None]
    if not read:
        return []
    return [
        "",
        "The gateway's own CPU inside its windows (its process_cpu_seconds_total):",
        "",
        "| gateway | " + " | ".join(r.level.label for r in read) + " |",
        "|---|" + "---|" * len(read),
        "| % of one core | " + " | ".join(fmt(r.gateway_cpu_share, 100) for r in read) + " |",
        "| CPU ms per 1000 output tokens | " + " | ".join(fmt(r.gateway_cpu_per_token, 1e6) for r in read) + " |",
    ]


def sweep_table(results: Sequence[LevelResult], level_name: str, scores: dict[str, str]) -> list[str]:
    """One row per target and level; the engines' own count of output tok/s beside the client's where it was read."""
    counted = any(r.engine_tok_s is not None or r.engine_problem for r in results)
    engine_head, engine_rule = (" engine's count |", "---|") if counted else ("", "")
    lines = [
        f"| target | {level_name} | output tok/s |{engine_head} total tok/s | req/s | TTFT p50 / p99 (ms) "
        "| TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) | e2e p50 / p99 (s) | ok / failed | goodput req/s | quality |",
        "|---|---|---|" + engine_rule + "---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        label = f"{r.level.value:g}"
        score = scores.get(r.target, "-")
        if not r.valid:
            blank = " |" * (9 if counted else 8)
            lines.append(f"| {r.target} | {label} | refused: see below |{blank} {score} |")
            continue
        s = r.summary
        if not s.samples.enough:
            label += " *few samples*"
        engine = f" {fmt(r.engine_tok_s)} |" if counted else ""
        lines.append(
            f"| {r.target} | {label} | {with_error(s.output_tok_s, s.steadiness.error)} |{engine} {fmt(s.total_tok_s)} "
            f"| {fmt(s.requests_s, digits=2)} "
            f"| {percentiles(s.ttft_s, 1000)} | {percentiles(s.tpot_s, 1000, 1)} | {percentiles(s.itl_s, 1000, 1)} "
            f"| {percentiles(s.e2e_s, digits=2)} "
            f"| {s.requests.ok} / {s.requests.failed} | {fmt(s.goodput.requests_s, digits=2)} | {score} |"
        )
    return lines


def notes_of(results: Sequence[LevelResult]) -> list[str]:
    notes = []
    for r in results:
        where = f"- {r.target} at {r.level.value:g}:"
        s, g = r.summary, r.loadgen
        notes += [f"{where} {p}" for p in (*r.problems, *r.failures) if p]
        if not s.samples.enough:
            notes.append(f"{where} {s.samples.advice()}")
        if not s.steadiness.steady:
            notes.append(f"{where} {s.steadiness.advice()}")
        if r.engine_problem:
            notes.append(f"{where} {r.engine_problem}")
        if r.gateway_cpu_problem:
            notes.append(f"{where} {r.gateway_cpu_problem}")
        if s.requests.cancelled_at_stop:
            notes.append(
                f"{where} {s.requests.cancelled_at_stop} requests sent inside the window were still running at the "
                "stop timeout; latencies cover only the ones that finished"
            )
        if (g.machine_busy_before or 0) > BUSY_MACHINE:
            notes.append(
                f"{where} other work kept {g.machine_busy_before:.0%} of the CPUs busy just before this run; it "
                "likely disturbed these numbers"
            )
        if s.requests.cancelled_with_tokens_in_window:
            notes.append(
                f"{where} {s.requests.cancelled_with_tokens_in_window} requests outlived the stop timeout with "
                "tokens inside the window; output tok/s undercounts them (raise --stop-timeout)"
            )
        if s.requests.late:
            notes.append(f"{where} {s.requests.late} requests sent late")
        if g.cpu_fraction > 0.8:
            notes.append(f"{where} the load generator used {g.cpu_fraction:.0%} of a core")
    return notes


def _level_key(label: str) -> float:
    return float(label[1:])


def write(
    folder: Path,
    meta: Meta,
    results: Sequence[LevelResult],
    pairs: Sequence[tuple[str, str]] = (),
    quality: Quality = (),
) -> Path:
    """Write the whole result folder and return it."""
    from loadtests.plots import plot_all

    folder.mkdir(parents=True, exist_ok=True)
    ratio_table = ratios(results, pairs)
    error_table = ratio_errors(results, ratio_table)
    summary = {
        **meta.to_json(),
        "results": [result_json(r) for r in results],
        "quality": {q.target: q.to_json() for q in quality},
        "ratios": ratio_table,
        "ratio_errors": error_table,
        "refused": sum(1 for r in results if not r.valid),
        "low_samples": sum(1 for r in results if not r.summary.samples.enough),
        "failed_criteria": sum(len(r.failures) for r in results)
        + len(quality_failures(quality, meta.quality.quality_tolerance)),
    }
    if meta.tenants is not None:
        from loadtests.tenant_report import totals

        summary["tenants_total"] = totals(results)
    (folder / "summary.json").write_text(json.dumps(finite(summary), indent=2, allow_nan=False))
    write_csv(folder / "requests.csv", results)
    valid = [r for r in results if r.valid]
    if meta.tenants is not None:
        from loadtests.tenant_plots import plot_tenants

        names = ", ".join(t["name"] for t in meta.tenants)
        plot_tenants(folder, valid, f"tenants {names}, model {meta.model}")
    else:
        plot_all(folder, valid, f"scenario {meta.config.scenario}, model {meta.model}")
    (folder / "report.md").write_text(markdown(meta, results, ratio_table, quality, error_table))
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
