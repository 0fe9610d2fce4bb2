"""Running Locust headless in a subprocess for one target and load level, and reading back its request records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from loadtests.accounting import RequestRecord
from loadtests.config import ROOT, LoadConfig, LocustRun, locust_argv, locust_env
from loadtests.progress import LiveProgress
from loadtests.sanity import Thresholds, broken_thresholds, impossible
from loadtests.stats import SLO, Summary, Window, summarize

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
# Seconds a Locust process may take beyond its plan (start-up, writing its summary) before it is killed.
LOCUST_GRACE_S = 120


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


def levels(config: LoadConfig) -> list[Level]:
    if config.rates is not None:
        return [Level(rate=r) for r in config.rates]
    return [Level(users=u) for u in config.users]


@dataclass(frozen=True)
class Setup:
    """A load config resolved against the model file: what every target is sent, and what judges the numbers."""

    config: LoadConfig = field(default_factory=LoadConfig)
    sampling: dict[str, Any] = field(default_factory=dict)
    max_model_len: int | None = None
    # Output tokens/s no run on this hardware can exceed (None: not checked).
    ceiling: float | None = None

    @property
    def slo(self) -> SLO:
        c = self.config
        return SLO(c.slo_ttft, c.slo_tpot, c.slo_e2e)

    @property
    def thresholds(self) -> Thresholds:
        c = self.config
        return Thresholds(c.max_error_rate, c.max_p99_ttft, c.min_output_tok_s)


@dataclass(frozen=True)
class LoadGen:
    """How the load generator itself fared."""

    exit_code: int
    wall_s: float
    cpu_s: float
    # One Locust process is one core at most: near 1.0 the load generator, not the server, sets the pace.
    cpu_fraction: float
    cpu_warning: bool = False
    machine_busy_before: float | None = None


@dataclass
class LevelResult:
    target: str
    level: Level
    summary: Summary
    problems: list[str]
    failures: list[str]
    records: list[RequestRecord]
    window: Window
    loadgen: LoadGen

    @property
    def valid(self) -> bool:
        return not self.problems


def locust_command(target: Target, level: Level, config: LoadConfig, run: LocustRun) -> list[str]:
    users = level.users if level.users is not None else 1
    # Users join over the first half of the warm-up (or --ramp): all starting in the same second would send every
    # prefill at once and keep the requests in lockstep long after.
    ramp = config.ramp if config.ramp is not None else config.warmup / 2
    spawn_rate = users / ramp if ramp >= 1 else float(users)
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
        "--stop-timeout",
        f"{config.stop_timeout:g}",
        "--exit-code-on-error",
        "0",
    ]
    if config.num_requests is None:
        cmd += ["-t", f"{config.warmup + config.duration:g}s"]
    return cmd + locust_argv(config, run)


def locust_run(target: Target, level: Level, setup: Setup, records: Path, salt: str) -> LocustRun:
    return LocustRun(
        model=target.model,
        api_key=target.key or "",
        sampling=json.dumps(setup.sampling),
        max_model_len=setup.max_model_len,
        rate=level.rate,
        salt=salt if setup.config.cache_salt else "",
        records=str(records),
    )


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


def wait(proc: subprocess.Popen[bytes], budget: float | None, progress: LiveProgress) -> int:
    """The process's exit code, showing progress meanwhile; past the budget it is killed."""
    deadline = None if budget is None else time.monotonic() + budget
    try:
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                progress.update()
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    return proc.wait()
    finally:
        progress.close()


@dataclass
class Launched:
    """A Locust process running one target at one level, and what its result will be read from."""

    target: Target
    level: Level
    setup: Setup
    proc: subprocess.Popen[bytes]
    records: Path
    log: Path
    started: float
    busy_before: float | None
    ended: float | None = None

    @property
    def budget(self) -> float | None:
        """Seconds after which the process is killed (None: by count a level takes as long as its requests do,
        each bounded by --request-timeout)."""
        c = self.setup.config
        return None if c.num_requests is not None else c.warmup + c.duration + c.stop_timeout + LOCUST_GRACE_S


def launch(target: Target, level: Level, setup: Setup, folder: Path, busy_before: float | None = None) -> Launched:
    """Start the Locust process of one target at one level; `collect` reads its result once it has exited."""
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    stem = f"{target.name}-{level.label}"
    records_path = raw / f"{stem}.jsonl"
    records_path.unlink(missing_ok=True)
    salt = f"{stem}-{time.time_ns()}"
    run = locust_run(target, level, setup, records_path, salt)
    cmd = locust_command(target, level, setup.config, run)
    # The key travels in the environment, not on the command line where `ps` shows it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(locust_env(run))
    log_path = raw / f"{stem}.locust.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return Launched(target, level, setup, proc, records_path, log_path, time.monotonic(), busy_before)


def collect(launched: Launched, code: int, window: Window | None = None) -> LevelResult:
    """The result of an exited Locust process, over its own measured window or the one given."""
    setup, level = launched.setup, launched.level
    config = setup.config
    wall = (launched.ended or time.monotonic()) - launched.started
    records, markers = read_records(launched.records)
    window = window or measurement_window(records, markers, config.warmup)
    summary = summarize(
        records, window, setup.slo, open_loop=level.rate is not None, late_tolerance=config.late_tolerance
    )
    stop = markers.get("stop", {})
    # The process's own CPU time, from its last marker: several run at once, so the children's total would mix them.
    cpu = float(stop.get("cpu_s", 0.0))
    loadgen = LoadGen(
        exit_code=code,
        wall_s=wall,
        cpu_s=cpu,
        cpu_fraction=cpu / wall if wall > 0 else 0.0,
        cpu_warning=bool(stop.get("loadgen_cpu_warning", False)),
        machine_busy_before=launched.busy_before,
    )
    problems = impossible(summary, [r for r in records if window.holds(r.start)], setup.ceiling)
    if code != 0:
        problems.append(f"locust exited with code {code}; see {launched.log}")
    if loadgen.cpu_warning:
        problems.append("the load generator ran above 90% CPU: it, not the server, set the pace")
    if "start" not in markers:
        problems.append("locust never started the test; see its log")
    failures = broken_thresholds(summary, setup.thresholds)
    return LevelResult(launched.target.name, level, summary, problems, failures, records, window, loadgen)


def run_level(target: Target, level: Level, setup: Setup, folder: Path, out: TextIO | None = None) -> LevelResult:
    launched = launch(target, level, setup, folder, machine_busy())
    progress = LiveProgress(f"{target.name} at {level.label}", launched.records, setup.config, out or sys.stderr)
    code = wait(launched.proc, launched.budget, progress)
    launched.ended = time.monotonic()
    return collect(launched, code)
