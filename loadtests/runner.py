"""Running Locust headless in a subprocess for one target and load level, and reading back its request records."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtests.accounting import RequestRecord
from loadtests.sanity import Thresholds, broken_thresholds, impossible
from loadtests.scenarios import Lengths
from loadtests.stats import SLO, Window, summarize

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # base URL, without /v1
    key: str | None
    model: str


@dataclass(frozen=True)
class Level:
    """Closed loop: `users` concurrent users. Open loop: `rate` requests/s with constant or Poisson arrivals."""

    users: int | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        return f"u{self.users}" if self.users is not None else f"r{self.rate:g}"

    @property
    def value(self) -> float:
        return float(self.users if self.users is not None else self.rate or 0.0)


@dataclass(frozen=True)
class LoadConfig:
    scenario: str = "chat"
    seed: int = 0
    lengths: Lengths = field(default_factory=Lengths)
    ignore_eos: bool = True
    sampling: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.7})
    warmup: float = 10.0
    duration: float = 60.0
    stop_timeout: float = 120.0
    max_requests: int | None = None
    arrival: str = "closed"
    max_in_flight: int = 256
    request_timeout: float = 900.0
    late_tolerance: float = 0.05
    # A fresh vLLM prefix-cache salt per run, so a run never reuses the KV cache of the run before it.
    cache_salt: bool = True
    pool_size: int = 2000


@dataclass
class LevelResult:
    target: str
    level: Level
    summary: dict[str, Any]
    problems: list[str]
    failures: list[str]
    records: list[RequestRecord]
    window: Window
    loadgen: dict[str, Any]

    @property
    def valid(self) -> bool:
        return not self.problems


@dataclass
class Checks:
    slo: SLO = field(default_factory=SLO)
    thresholds: Thresholds = field(default_factory=Thresholds)
    ceiling: float | None = None


def locust_command(target: Target, level: Level, config: LoadConfig, records: Path, salt: str) -> list[str]:
    users = level.users if level.users is not None else 1
    # Users join over the first half of the warm-up: all starting in the same second would send every prefill at
    # once and keep the requests in lockstep long after.
    spawn_rate = users / (config.warmup / 2) if config.warmup >= 2 else float(users)
    lengths = config.lengths
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--host",
        target.url,
        "-u",
        str(users),
        "-r",
        f"{max(spawn_rate, 0.1):g}",
        "-t",
        f"{config.warmup + config.duration:g}s",
        "--stop-timeout",
        f"{config.stop_timeout:g}",
        "--exit-code-on-error",
        "0",
        "--model",
        target.model,
        "--scenario",
        config.scenario,
        "--seed",
        str(config.seed),
        "--pool-size",
        str(config.pool_size),
        "--ignore-eos",
        str(int(config.ignore_eos)),
        "--sampling",
        json.dumps(config.sampling),
        "--arrival",
        config.arrival,
        "--max-in-flight",
        str(config.max_in_flight),
        "--warmup",
        f"{config.warmup:g}",
        "--request-timeout",
        f"{config.request_timeout:g}",
        "--records",
        str(records),
    ]
    for flag, value in (
        ("--input-len", lengths.input_len),
        ("--output-len", lengths.output_len),
        ("--max-output-len", lengths.max_output_len),
        ("--max-model-len", lengths.max_model_len),
        ("--max-requests", config.max_requests),
        ("--rate", level.rate),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    if config.cache_salt:
        cmd += ["--cache-salt", salt]
    return cmd


def read_records(path: Path) -> tuple[list[RequestRecord], dict[str, dict[str, Any]]]:
    records: list[RequestRecord] = []
    markers: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records, markers
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        data = json.loads(line)
        kind = data.get("type")
        if kind == "request":
            records.append(RequestRecord.from_json(data))
        elif isinstance(kind, str):
            markers[kind] = data
    return records, markers


def measurement_window(records: list[RequestRecord], markers: dict[str, dict[str, Any]], warmup: float) -> Window:
    """From the end of the warm-up to the moment Locust began stopping (no new requests after that)."""
    starts = [r.start for r in records]
    begin = float(markers.get("start", {}).get("t", min(starts, default=0.0)))
    stopping = markers.get("stopping") or markers.get("stop")
    end = float(stopping["t"]) if stopping else max(starts, default=begin)
    return Window(begin + warmup, max(begin + warmup, end))


def machine_busy(seconds: float = 2.0) -> float | None:
    """Fraction of all CPUs busy over a short idle moment before a run (None where /proc/stat is missing).

    Nothing of the benchmark runs then (the servers are idle between runs), so what shows is other work on a shared
    machine, which would disturb the numbers.
    """

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return (total - (idle1 - idle0)) / total if total > 0 else None


def run_level(target: Target, level: Level, config: LoadConfig, folder: Path, checks: Checks) -> LevelResult:
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    stem = f"{target.name}-{level.label}"
    records_path = raw / f"{stem}.jsonl"
    records_path.unlink(missing_ok=True)
    salt = f"{stem}-{time.time_ns()}"
    cmd = locust_command(target, level, config, records_path, salt)
    # The key travels in the environment, not on the command line where `ps` shows it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env["LOADTEST_API_KEY"] = target.key or ""
    budget = config.warmup + config.duration + config.stop_timeout + 120
    busy = machine_busy()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with (raw / f"{stem}.locust.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    records, markers = read_records(records_path)
    window = measurement_window(records, markers, config.warmup)
    summary = summarize(
        records, window, checks.slo, open_loop=config.arrival != "closed", late_tolerance=config.late_tolerance
    )
    loadgen = {
        "exit_code": code,
        "wall_s": wall,
        "cpu_s": cpu,
        # One Locust process is one core at most: near 1.0 the load generator, not the server, sets the pace.
        "cpu_fraction": cpu / wall if wall > 0 else 0.0,
        "cpu_warning": bool(markers.get("stop", {}).get("loadgen_cpu_warning", False)),
        "machine_busy_before": busy,
    }
    problems = impossible(summary, [r for r in records if window.holds(r.start)], checks.ceiling)
    if code != 0:
        problems.append(f"locust exited with code {code}; see {raw / (stem + '.locust.log')}")
    if loadgen["cpu_warning"]:
        problems.append("the load generator ran above 90% CPU: it, not the server, set the pace")
    if "start" not in markers:
        problems.append("locust never started the test; see its log")
    failures = broken_thresholds(summary, checks.thresholds)
    return LevelResult(target.name, level, summary, problems, failures, records, window, loadgen)


def describe(config: LoadConfig) -> dict[str, Any]:
    data = asdict(config)
    data["lengths"] = asdict(config.lengths)
    return data
