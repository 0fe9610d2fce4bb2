"""Running Locust headless in a subprocess for one target and load level, and reading back its request records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from loadtests.accounting import RequestRecord
from loadtests.config import ROOT, LoadConfig, LocustRun, locust_argv, locust_env
from loadtests.engine_counter import CPU_COUNTER, CounterWatch
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
    # Metrics URLs of the engines this target's requests reach: their generated-token counter is read beside the
    # client's count (loadtests/engine_counter.py). Empty: not read.
    counters: tuple[str, ...] = ()
    # Metrics URLs of the gateway in this target's path: the CPU its process spends is read the same way, with
    # `metrics_key` when its /metrics asks for one.
    cpu_meters: tuple[str, ...] = ()
    metrics_key: str | None = None


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
    # Tokens the engines' own counter grew by inside the window (None: not read, or not readable: then
    # `engine_problem` says why).
    engine_tokens: float | None = None
    engine_problem: str | None = None
    # CPU seconds the gateway's process spent inside the window (None: not read, or `gateway_cpu_problem` says why).
    gateway_cpu_s: float | None = None
    gateway_cpu_problem: str | None = None

    @property
    def engine_tok_s(self) -> float | None:
        seconds = self.window.seconds
        return self.engine_tokens / seconds if self.engine_tokens is not None and seconds > 0 else None

    @property
    def gateway_cpu_share(self) -> float | None:
        """The gateway's CPU inside the window as a fraction of one core."""
        seconds = self.window.seconds
        return self.gateway_cpu_s / seconds if self.gateway_cpu_s is not None and seconds > 0 else None

    @property
    def gateway_cpu_per_token(self) -> float | None:
        """The gateway's CPU seconds per output token the client received inside the window."""
        tokens = self.summary.output_tok_s * self.window.seconds
        return self.gateway_cpu_s / tokens if self.gateway_cpu_s is not None and tokens > 0 else None

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
    counter: CounterWatch | None = None
    cpu_meter: CounterWatch | None = None

    @property
    def budget(self) -> float | None:
        """Seconds after which the process is killed (None: by count a level takes as long as its requests do,
        each bounded by --request-timeout)."""
        c = self.setup.config
        return None if c.num_requests is not None else c.warmup + c.duration + c.stop_timeout + LOCUST_GRACE_S


def launch(
    target: Target,
    level: Level,
    setup: Setup,
    folder: Path,
    busy_before: float | None = None,
    round_no: int = 1,
) -> Launched:
    """Start the Locust process of one target at one level; `collect` reads its result once it has exited."""
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    stem = f"{target.name}-{level.label}" + (f"-round{round_no}" if setup.config.rounds > 1 else "")
    records_path = raw / f"{stem}.jsonl"
    records_path.unlink(missing_ok=True)
    salt = f"{stem}-{time.time_ns()}"
    run = locust_run(target, level, setup, records_path, salt)
    cmd = locust_command(target, level, setup.config, run)
    # The key travels in the environment, not on the command line where `ps` shows it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(locust_env(run))
    log_path = raw / f"{stem}.locust.log"
    # Stopped by `collect`, which reads them; here only if Locust cannot be started at all.
    counter = CounterWatch(target.counters, target.key).start() if target.counters else None
    cpu_meter = (
        CounterWatch(target.cpu_meters, target.metrics_key, name=CPU_COUNTER).start() if target.cpu_meters else None
    )
    try:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    except BaseException:
        for watch in (counter, cpu_meter):
            if watch is not None:
                watch.stop()
        raise
    return Launched(
        target, level, setup, proc, records_path, log_path, time.monotonic(), busy_before, None, counter, cpu_meter
    )


def read_counter(watch: CounterWatch | None, window: Window, what: str) -> tuple[float | None, str | None]:
    """A watched counter's growth over the window once its thread is stopped, or why it has no figure (not a
    reason to refuse the client's numbers: only another view of them is missing)."""
    if watch is None:
        return None, None
    watch.stop()
    value = watch.grown(window)
    if value is None:
        why = watch.failed or "its samples do not cover the window, or it went down"
        return None, f"{what} could not be read over the window: {why}"
    return value, None


def join_counters(rounds: Sequence[tuple[float | None, str | None]]) -> tuple[float | None, str | None]:
    """The rounds' growths added up (None if any round has none), and the first round's problem with its number."""
    values = [value for value, _ in rounds]
    total = None if any(v is None for v in values) else sum(v for v in values if v is not None)
    problem = next((f"round {i}: {why}" for i, (_, why) in enumerate(rounds, 1) if why), None)
    return total, problem


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
    engine_tokens, engine_problem = read_counter(launched.counter, window, "the engines' token counter")
    gateway_cpu_s, gateway_cpu_problem = read_counter(launched.cpu_meter, window, "the gateway's CPU counter")
    return LevelResult(
        launched.target.name,
        level,
        summary,
        problems,
        failures,
        records,
        window,
        loadgen,
        engine_tokens,
        engine_problem,
        gateway_cpu_s,
        gateway_cpu_problem,
    )


def join_rounds(rounds: Sequence[LevelResult], setup: Setup) -> LevelResult:
    """One result for a target at a level from its rounds: their windows joined, every figure recomputed over all
    of them (percentiles over all requests, tokens/s over all spans), each round's problems kept with its number."""
    if len(rounds) == 1:
        return rounds[0]
    first = rounds[0]
    records = [r for result in rounds for r in result.records]
    window = Window.join([r.window for r in rounds])
    summary = summarize(
        records,
        window,
        setup.slo,
        open_loop=first.level.rate is not None,
        late_tolerance=setup.config.late_tolerance,
    )
    problems = [f"round {i}: {p}" for i, r in enumerate(rounds, 1) for p in r.problems]
    engine_tokens, engine_problem = join_counters([(r.engine_tokens, r.engine_problem) for r in rounds])
    gateway_cpu_s, gateway_cpu_problem = join_counters([(r.gateway_cpu_s, r.gateway_cpu_problem) for r in rounds])
    wall = sum(r.loadgen.wall_s for r in rounds)
    cpu = sum(r.loadgen.cpu_s for r in rounds)
    busy = [r.loadgen.machine_busy_before for r in rounds if r.loadgen.machine_busy_before is not None]
    loadgen = LoadGen(
        exit_code=next((r.loadgen.exit_code for r in rounds if r.loadgen.exit_code), 0),
        wall_s=wall,
        cpu_s=cpu,
        cpu_fraction=max(r.loadgen.cpu_fraction for r in rounds),
        cpu_warning=any(r.loadgen.cpu_warning for r in rounds),
        machine_busy_before=max(busy) if busy else None,
    )
    failures = broken_thresholds(summary, setup.thresholds)
    return LevelResult(
        first.target,
        first.level,
        summary,
        problems,
        failures,
        records,
        window,
        loadgen,
        engine_tokens,
        engine_problem,
        gateway_cpu_s,
        gateway_cpu_problem,
    )


def run_level(
    target: Target, level: Level, setup: Setup, folder: Path, out: TextIO | None = None, round_no: int = 1
) -> LevelResult:
    launched = launch(target, level, setup, folder, machine_busy(), round_no)
    name = f"{target.name} at {level.label}" + (f" (round {round_no})" if setup.config.rounds > 1 else "")
    progress = LiveProgress(name, launched.records, setup.config, out or sys.stderr)
    code = wait(launched.proc, launched.budget, progress)
    launched.ended = time.monotonic()
    return collect(launched, code)
