"""The tenants part of a report: one row per tenant over the shared window, the sum of all, and each one's setup."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loadtests.numbers import fmt, percentiles
from loadtests.runner import LevelResult

# Error messages listed per tenant in the notes.
TOP_ERRORS = 3


def shape(described: dict[str, Any]) -> str:
    if described.get("users") is not None:
        return f"{described['users']} users"
    arrival = described.get("options", {}).get("arrival")
    return f"{described['rate']:g} req/s" + (f" {arrival}" if arrival else "")


def totals(results: Sequence[LevelResult]) -> dict[str, Any] | None:
    """Every tenant together over the shared window (None when a tenant's numbers were refused: a sum with a
    missing part would mislead)."""
    if not results or any(not r.valid for r in results):
        return None
    return {
        "window_s": results[0].summary.window_s,
        "output_tok_s": sum(r.summary.output_tok_s for r in results),
        "prompt_tok_s": sum(r.summary.prompt_tok_s for r in results),
        "total_tok_s": sum(r.summary.total_tok_s for r in results),
        "requests_s": sum(r.summary.requests_s for r in results),
        "output_share": {
            r.target: (r.summary.output_tok_s / out if (out := sum(x.summary.output_tok_s for x in results)) else None)
            for r in results
        },
    }


def tenant_lines(tenants: Sequence[dict[str, Any]], results: Sequence[LevelResult]) -> list[str]:
    """The tenants table and what each tenant was, for report.md."""
    by_name = {r.target: r for r in results}
    window = results[0].window.seconds if results else 0.0
    lines = [
        f"Tenants, all at once; every number covers the same {window:.0f} s window (where the tenants' own "
        "windows overlap):",
        "",
        "| tenant | load | output tok/s | total tok/s | req/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) "
        "| ITL p50 / p99 (ms) | e2e p50 / p99 (s) | ok / failed | goodput req/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for described in tenants:
        r = by_name.get(described["name"])
        if r is None:
            continue
        load = shape(described)
        if not r.valid:
            lines.append(f"| {r.target} | {load} | refused: see below | | | | | | | | |")
            continue
        s = r.summary
        if not s.samples.enough:
            load += " *few samples*"
        lines.append(
            f"| {r.target} | {load} | {fmt(s.output_tok_s)} | {fmt(s.total_tok_s)} | {fmt(s.requests_s, digits=2)} "
            f"| {percentiles(s.ttft_s, 1000)} | {percentiles(s.tpot_s, 1000, 1)} | {percentiles(s.itl_s, 1000, 1)} "
            f"| {percentiles(s.e2e_s, digits=2)} | {s.requests.ok} / {s.requests.failed} "
            f"| {fmt(s.goodput.requests_s, digits=2)} |"
        )
    total = totals(results)
    if total is not None:
        lines.append(
            f"| **all tenants** | | {fmt(total['output_tok_s'])} | {fmt(total['total_tok_s'])} "
            f"| {fmt(total['requests_s'], digits=2)} | | | | | | |"
        )
    lines += ["", "The tenants:", ""]
    for described in tenants:
        own = ", ".join(f"{k} {v}" for k, v in described.get("options", {}).items())
        about = f" ({described['description']})" if described.get("description") else ""
        head = f"- {described['name']}{about}: {shape(described)}, key from {described['key']}"
        lines.append(head + (f"; {own}" if own else ""))
    return lines


def error_notes(results: Sequence[LevelResult]) -> list[str]:
    """The commonest error messages of each tenant's failed requests (a 429 from the gateway's queue, say)."""
    notes = []
    for r in results:
        for message, count in list(r.summary.errors.items())[:TOP_ERRORS]:
            notes.append(f"- {r.target}: {count} x {message}")
    return notes
