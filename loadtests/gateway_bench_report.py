"""The gateway benchmark's report: ratios to direct, the added time to first token, problems, the terminal table."""

from __future__ import annotations

import statistics
from typing import Any

# Above this share of its core the load generator (or the core it shares with the upstream) may be what limits.
BUSY_LIMIT = 0.9
# Other work on a core above this share in a phase is worth a line: the machine is shared.
NOISE_NOTE = 0.1
MS = 1000.0
PROFILE_LINES = 15
ROOT_SHARE = 0.9


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _phase(report: dict[str, Any], target: str, kind: str) -> dict[str, Any]:
    return next(p for p in report["phases"] if p["target"] == target and p["kind"] == kind)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def ratios(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(each gateway against direct and against the first gateway, per kind; the TTFT summary)."""
    names = [g["name"] for g in report["gateways"]]
    out: dict[str, Any] = {}
    for name in names:
        out[name] = {}
        for kind in dict.fromkeys(p["kind"] for p in report["phases"]):
            gw = _phase(report, name, kind)
            entry: dict[str, Any] = {}
            for base in ("direct", *names[:1]):
                if base == name:
                    continue
                ref = _phase(report, base, kind)
                entry[f"vs_{base}"] = {
                    "rps": _ratio(gw["rps"], ref["rps"]),
                    "p50": _ratio(gw["latency_ms"]["p50"], ref["latency_ms"]["p50"]),
                    "p99": _ratio(gw["latency_ms"]["p99"], ref["latency_ms"]["p99"]),
                }
            out[name][kind] = entry
    ttft = report["ttft"]
    samples: dict[str, list[float]] = ttft["samples_s"]
    direct = samples["direct"]
    summary: dict[str, Any] = {
        "requests": ttft["requests"],
        "connections": 1,
        "direct_ms": {"p50": pct(direct, 0.5) * MS, "p99": pct(direct, 0.99) * MS},
        "gateways": {},
        "cpu": ttft["cpu"],
    }
    for name in names:
        through = samples[name]
        pairs = [g - d for g, d in zip(through, direct, strict=True)]
        summary["gateways"][name] = {
            "p50_ms": pct(through, 0.5) * MS,
            "p99_ms": pct(through, 0.99) * MS,
            "added_p50_ms": (pct(through, 0.5) - pct(direct, 0.5)) * MS,
            "added_median_of_pairs_ms": statistics.median(pairs) * MS,
        }
    return out, summary


def load_share(phase: dict[str, Any]) -> float:
    """The share of their core the upstream, wrk and this process used together (other work not counted)."""
    procs = phase["cpu"]["processes"]
    return float(procs["upstream"] + procs["wrk"] + procs["bench"])


def noise(report: dict[str, Any], phase: dict[str, Any]) -> list[float]:
    """Per core, the share of it used by processes other than ours (the machine is shared)."""
    settings, cpu = report["settings"], phase["cpu"]
    procs = cpu["processes"]
    gateways = sum(procs[g["name"]] for g in report["gateways"])
    ours = {settings["gateway_cpu"]: gateways, settings["load_cpu"]: load_share(phase)}
    return [max(0.0, busy - ours.get(core, 0.0)) for core, busy in enumerate(cpu["cores"])]


def problems(report: dict[str, Any]) -> list[str]:
    """What makes a number untrustworthy: failed requests, a saturated load generator or load core."""
    found = []
    for p in report["phases"]:
        label = f"{p['target']} {p['kind']}"
        if p["requests"] == 0 or p["failed"]:
            found.append(f"{label}: {p['failed']} of {p['requests']} requests failed ({p['errors']})")
        wrk = p["cpu"]["processes"]["wrk"]
        if wrk >= BUSY_LIMIT:
            found.append(f"{label}: wrk used {wrk:.0%} of its core: the load generator may be the bottleneck")
        if p["target"] != "direct" and load_share(p) >= BUSY_LIMIT:
            found.append(
                f"{label}: the upstream and load generator used {load_share(p):.0%} of their core: "
                "the gateway may not be what limits this phase"
            )
    return found


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"llmserve bench gateway: {s['connections']} connections, {s['duration_s']} s phases ({s['warmup_s']} s "
        f"warm-up), {s['events']} events per stream; gateway on CPU {s['gateway_cpu']}, upstream and wrk on CPU "
        f"{s['load_cpu']}; CPU use as a share of one core",
        "",
        f"{'target':<14}{'kind':<8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}"
        f"{'gateway':>9}{'upstream':>10}{'wrk':>6}{'load side':>11}{'other work':>12}",
    ]
    for p in report["phases"]:
        procs = p["cpu"]["processes"]
        gw = procs.get(p["target"]) if p["target"] != "direct" else None
        other = "/".join(f"{x:.2f}" for x in noise(report, p))
        lines.append(
            f"{p['target']:<14}{p['kind']:<8}{p['rps']:>10,.0f}{p['latency_ms']['p50']:>9.2f}"
            f"{p['latency_ms']['p99']:>9.2f}{p['failed']:>8}{_fmt(gw):>9}{procs['upstream']:>10.2f}"
            f"{procs['wrk']:>6.2f}{load_share(p):>11.2f}{other:>12}"
        )
    lines.append("")
    for name, kinds in report["ratios"].items():
        for kind, against in sorted(kinds.items()):
            for base, r in against.items():
                lines.append(
                    f"{name} {base.replace('_', ' ')}, {kind}: req/s {_fmt(r['rps'], 3)}x, "
                    f"p50 {_fmt(r['p50'], 1)}x, p99 {_fmt(r['p99'], 1)}x"
                )
    t = report["ttft"]
    for name, g in t["gateways"].items():
        lines.append(
            f"{name} added TTFT at 1 connection ({t['requests']} alternating requests): p50 "
            f"{g['added_p50_ms']:+.2f} ms (direct {t['direct_ms']['p50']:.2f}, through {g['p50_ms']:.2f}; "
            f"median of pairs {g['added_median_of_pairs_ms']:+.2f})"
        )
    wrk_max = max(p["cpu"]["processes"]["wrk"] for p in report["phases"])
    gateway_phases = [p for p in report["phases"] if p["target"] != "direct"]
    load_max = max((load_share(p) for p in gateway_phases), default=0.0)
    lines.append(
        f"load generator: wrk used at most {wrk_max:.0%} of its core; in the gateway phases the upstream, wrk and "
        f"this process used at most {load_max:.0%} of theirs (limit {BUSY_LIMIT:.0%})"
    )
    noisy = [p for p in report["phases"] if max(noise(report, p)) > NOISE_NOTE]
    if noisy:
        lines.append(f"other work used more than {NOISE_NOTE:.0%} of a core in {len(noisy)} phase(s): expect noise")
    for prof in report.get("profiles", []):
        lines.append("")
        lines.append(
            f"profile of {prof['gateway']} {prof['kind']} ({prof['samples']} samples, "
            f"{prof['rps_under_profiler']:,.0f} req/s under py-spy; {prof['file']}):"
        )
        lines.append(f"  {'self':>6} {'total':>6}  function")
        for frame, own, total in prof["self"][:PROFILE_LINES]:
            lines.append(f"  {own:>6.1%} {total:>6.1%}  {frame}")
        # The frames every sample shares (the interpreter, the loop's run) say nothing: the rest, by total.
        inner = [(frame, total) for frame, total in prof["total"] if total < ROOT_SHARE][:PROFILE_LINES]
        lines.append(f"  {'':>6} {'total':>6}  function (most time below it)")
        lines.extend(f"  {'':>6} {total:>6.1%}  {frame}" for frame, total in inner)
    lines.extend(f"PROBLEM: {problem}" for problem in report["problems"])
    return "\n".join(lines)
