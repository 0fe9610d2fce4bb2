"""The rows and the table of `llmserve bench sweep`, from each variant's `bench run` and `bench quality` folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtests.stats import MIN_SAMPLES

FEW = "*few samples*"
# Marks a figure of a level with fewer than MIN_SAMPLES measured requests, as the bench's own report does.
FEW_MARK = " †"


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def levels_of(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per user level of one `bench run` summary.json: output tok/s, TTFT p50 (ms), samples and flags.

    A refused level (numbers under `unverified`) keeps its sample count but shows no figures."""
    levels = []
    for result in summary.get("results", []):
        users = result["level"]["users"]
        if users is None:
            continue
        valid = bool(result["valid"])
        numbers = result if valid else result.get("unverified", {})
        p50 = numbers.get("ttft_s", {}).get("p50")
        requests = numbers.get("requests", {})
        levels.append(
            {
                "users": users,
                "valid": valid,
                "problems": result.get("problems", []),
                "output_tok_s": numbers.get("output_tok_s") if valid else None,
                "ttft_p50_ms": p50 * 1000 if valid and p50 is not None else None,
                "samples": numbers.get("samples", {}).get("measured", 0),
                "low_samples": bool(result["low_samples"]),
                "advice": numbers.get("samples", {}).get("suggested_duration_s"),
                "requests_failed": requests.get("failed", 0),
            }
        )
    return levels


def variant_row(info: dict[str, Any], bench: Path, quality: Path) -> dict[str, Any]:
    """What sweep.json keeps of one variant: how it ran (`info`), its levels and its quality score."""
    row = dict(info)
    summary = read_json(bench / "summary.json")
    row["levels"] = levels_of(summary) if summary is not None else []
    scored = read_json(quality / "quality.json")
    results = (scored or {}).get("results", {})
    score = results.get(info["name"]) or next(iter(results.values()), None)
    row["quality"] = {k: score[k] for k in ("correct", "total", "errors")} if score else None
    return row


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _cell(level: dict[str, Any] | None, key: str) -> str:
    if level is None:
        return "-"
    if not level["valid"]:
        return "refused"
    return _num(level[key]) + (FEW_MARK if level["low_samples"] else "")


def _settings(overrides: dict[str, Any]) -> str:
    parts = []
    for key, value in overrides.items():
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        parts.append(f"{key}={shown}")
    return ", ".join(parts).replace("|", "\\|")


def _load(info: dict[str, Any]) -> str:
    start, end = info.get("load_start"), info.get("load_end")
    return f"{start[0]:.2f} → {end[0]:.2f}" if start and end else "-"


def table(sweep: dict[str, Any]) -> list[str]:
    users = sweep["users"]
    head = ["variant", "settings", *(f"out tok/s {u}u" for u in users), *(f"TTFT p50 ms {u}u" for u in users)]
    head += ["quality", "startup s", "load avg 1 min, start → end"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in sweep["variants"]:
        by_users = {level["users"]: level for level in v["levels"]}
        cells = [v["name"], _settings(v["overrides"])]
        cells += [_cell(by_users.get(u), "output_tok_s") for u in users]
        cells += [_cell(by_users.get(u), "ttft_p50_ms") for u in users]
        q = v.get("quality")
        cells += [f"{q['correct']}/{q['total']}" if q else "-", _num(v.get("startup_s")), _load(v)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def samples_table(sweep: dict[str, Any]) -> list[str]:
    users = sweep["users"]
    lines = ["| variant | " + " | ".join(f"{u} users" for u in users) + " |", "|---|" + "---|" * len(users)]
    for v in sweep["variants"]:
        by_users = {level["users"]: level for level in v["levels"]}
        cells = []
        for u in users:
            level = by_users.get(u)
            cells.append("-" if level is None else f"{level['samples']}" + (f" {FEW}" if level["low_samples"] else ""))
        lines.append(f"| {v['name']} | " + " | ".join(cells) + " |")
    return lines


def notes(sweep: dict[str, Any]) -> list[str]:
    out = []
    for v in sweep["variants"]:
        if v.get("error"):
            out.append(f"- {v['name']}: {v['error'].splitlines()[0]} (see {v['name']}/engine.log)")
        for key, command, log in (("bench_exit", "bench run", "bench"), ("quality_exit", "bench quality", "quality")):
            if v.get(key):
                out.append(f"- {v['name']}: `{command}` exited with {v[key]} (see {v['name']}/{log}.log)")
        q = v.get("quality")
        if q and q.get("errors"):
            out.append(f"- {v['name']}: {q['errors']} quality questions got no answer")
        for level in v["levels"]:
            where = f"- {v['name']} at {level['users']} users:"
            if not level["valid"]:
                out.append(f"{where} refused ({'; '.join(level['problems'])})")
            if level["requests_failed"]:
                out.append(f"{where} {level['requests_failed']} failed requests")
            if level["low_samples"] and level["advice"] is not None:
                out.append(f"{where} {FEW}: `--duration {level['advice']:g}` would measure {MIN_SAMPLES}")
    return out


def markdown(sweep: dict[str, Any]) -> str:
    users = ", ".join(map(str, sweep["users"]))
    lines = [
        f"# Engine sweep: {Path(sweep['base']).name}",
        "",
        f"- command: `{sweep['command']}`",
        f"- started {sweep['created']} on {sweep['cpus']} CPUs; base model file `{sweep['base']}`, variants from "
        f"`{sweep['sweep_file']}`",
        f"- each variant: its own engine (`llmserve engine`), then `llmserve bench run` at {users} users, "
        f"{sweep['output_len']} output tokens per request (ignore_eos), temperature 0, {sweep['warmup_s']:g} s "
        f"warm-up and {sweep['duration_s']:g} s measured per level, then `llmserve bench quality` (greedy)",
        "- out tok/s: output tokens/s inside the measured window; TTFT p50 from the requests started inside it",
        f"- †: fewer than {MIN_SAMPLES} measured requests at that level ({FEW}): its percentile is unreliable",
        "- startup s: from starting the engine to its first healthy /health; the load average is the machine's "
        "(os.getloadavg) before the engine started and after it stopped",
        "",
        *table(sweep),
        "",
        "## Measured requests per level",
        "",
        *samples_table(sweep),
    ]
    found = notes(sweep)
    if found:
        lines += ["", "## Notes", "", *found]
    return "\n".join(lines) + "\n"
