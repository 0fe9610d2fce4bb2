"""One soak run: Redis, keys, the gateway, Locust at overload, the faults; then quiet, then the figures."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from serve.gateway.limits.redis import IDLE_EXPIRY_S as REDIS_IDLE_EXPIRY_S
from tests.soak.faults import GRACE, Faults, Window, plan_for
from tests.soak.figures import Figures, median_rss, mib
from tests.soak.gateway import ROOT, SoakGateway, start_gateway
from tests.soak.keyring import KeyRing
from tests.soak.redis_server import RedisServer
from tests.soak.sampler import Sample, Sampler, Targets
from tests.soak.verdict import (
    canary_hits,
    client_view,
    error_reasons,
    errors_outside,
    read_jsonl,
    server_errors,
    tracebacks,
)

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
KEY_PREFIX = "soak:limits:"
KEYS_EVERY = 20.0
CANCEL_SHARE = 0.1
SLOW_USERS = 3
TIGHT_USERS = 2
# Seconds Locust gives a running request at the end before it cuts it off.
STOP_TIMEOUT = 20
# The load goes on at least this long after the last fault is over (the stack must serve again), and at most this
# much longer than planned when an engine restart is slow.
AFTER_FAULTS = 30.0
OVERTIME = 900.0
# How long everything may take to come to rest once the load stops.
QUIET_WITHIN = 60.0
# Once the last request has ended: time for the engine to abort what it was generating for a gone client.
SETTLE_AFTER_IDLE = 3.0
# vLLM closes idle keep-alive connections after 5 s (uvicorn's default): wait that out before counting fds.
KEEPALIVE_SETTLE = 8.0
# Requests per second of load that the soak may send at most (a bound, far above what 2 cores serve).
MAX_REQUESTS_PER_SECOND = 40


@dataclass(frozen=True)
class Engine:
    """The engine behind the soak's gateway: where it is, and how to find the process to kill."""

    url: str
    key: str
    model_file: str
    tokenizer: str | None
    max_num_seqs: int
    pid: Callable[[], int]
    # Its logs and its supervisor's, searched for canaries with the soak's own.
    logs: tuple[Path, ...] = ()


def warmup_for(duration: float) -> float:
    """Seconds of load before the RSS baseline: every user is running and the first answers are through."""
    return min(60.0, max(20.0, 0.15 * duration))


def streamers_for(max_num_seqs: int) -> int:
    """Users that keep more requests in flight than the engine batches (max_num_seqs): the rest queue in vLLM."""
    return max_num_seqs + max(8, max_num_seqs // 4)


def at_rest(s: Sample) -> bool:
    return (
        s.inflight == 0
        and s.queued == 0
        and s.engine_running == 0
        and s.engine_waiting == 0
        and s.slots_total == 0
        and s.conns.get("client", 1) == 0
    )


class Soak:
    def __init__(self, folder: Path, engine: Engine, duration: float) -> None:
        self.folder = folder
        self.engine = engine
        self.duration = duration
        self.warmup = warmup_for(duration)
        self.canary = "soak-canary-" + secrets.token_hex(8)
        self.metrics_key = "soak-metrics-" + secrets.token_hex(12)
        self.users = {"stream": streamers_for(engine.max_num_seqs), "slow": SLOW_USERS, "tight": TIGHT_USERS}
        self.figures = Figures(
            duration_s=duration, warmup_s=self.warmup, users=self.users, max_num_seqs=engine.max_num_seqs
        )

    def run(self) -> Figures:
        started = time.monotonic()
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        redis = RedisServer(folder / "redis.log")
        redis.start()
        ring = KeyRing.create(folder / "keys.yaml", sum(self.users.values()))
        gateway: SoakGateway | None = None
        stop = threading.Event()
        try:
            gateway = start_gateway(
                folder / "gateway",
                engine_url=self.engine.url,
                engine_key=self.engine.key,
                model_file=self.engine.model_file,
                tokenizer=self.engine.tokenizer,
                keys_file=ring.path,
                redis_url=redis.url,
                key_prefix=KEY_PREFIX,
                metrics_key=self.metrics_key,
            )
            ring.url = gateway.url
            targets = Targets(gateway.pid, gateway.url, gateway.port, self.engine.url, redis.url, KEY_PREFIX)
            sampler = Sampler(targets, lambda: list(ring.ids), folder / "samples.jsonl", self.metrics_key)
            sampler.start()
            try:
                self._load(gateway, ring, redis, sampler, stop)
            finally:
                stop.set()
                sampler.stop()
            self.figures.gateway_exit = gateway.stop()
        finally:
            stop.set()
            if gateway is not None and gateway.proc.poll() is None:
                gateway.proc.kill()
            redis.stop()
        self.figures.wall_s = round(time.monotonic() - started, 1)
        self._judge(gateway, ring, sampler)
        (folder / "soak.json").write_text(json.dumps(asdict(self.figures), indent=2))
        return self.figures

    def _load(
        self, gateway: SoakGateway, ring: KeyRing, redis: RedisServer, sampler: Sampler, stop: threading.Event
    ) -> None:
        baseline = [sampler.now() for _ in range(3)][-1]
        self.baseline = baseline
        rotation = threading.Thread(target=ring.run, args=(stop, KEYS_EVERY), name="soak-keys", daemon=True)
        faults = Faults(plan_for(self.duration, self.warmup), self.engine.url, self.engine.pid, redis, stop)
        self.faults = faults
        locust = self._locust(gateway, ring)
        self.load_start = time.time()
        rotation.start()
        faults.start(self.load_start)
        self._run_load(locust, faults)
        self.load_end = time.time()
        stop.set()
        rotation.join(timeout=30)
        # The engine may still be coming back: the figures at rest need it.
        faults.join(timeout=900)
        self.rest = self._come_to_rest(sampler)
        time.sleep(KEEPALIVE_SETTLE)
        # The pooled Redis connections the restart broke and no call took since are closed once idle for the
        # limiter's expiry (checked every third of it): wait that out too before counting sockets.
        recovered = faults.recovered_at
        if recovered is not None:
            time.sleep(max(0.0, recovered + REDIS_IDLE_EXPIRY_S * 4 / 3 + 1 - time.time()))
        self.end = [sampler.now() for _ in range(3)][-1]

    def _run_load(self, locust: subprocess.Popen[bytes], faults: Faults) -> None:
        """The planned length, and on until AFTER_FAULTS past the last fault's recovery (within OVERTIME); then
        SIGTERM, which Locust answers by letting running requests finish for STOP_TIMEOUT."""
        planned, latest = self.load_start + self.duration, self.load_start + self.duration + OVERTIME
        while locust.poll() is None and time.time() < latest:
            recovered = faults.recovered_at
            if time.time() >= planned and recovered is not None and time.time() >= recovered + AFTER_FAULTS:
                break
            time.sleep(0.5)
        locust.send_signal(signal.SIGTERM)
        try:
            self.figures.locust_exit = locust.wait(timeout=STOP_TIMEOUT + 60)
        except subprocess.TimeoutExpired:
            locust.kill()
            self.figures.locust_exit = locust.wait()

    def _come_to_rest(self, sampler: Sampler) -> Sample:
        """The sample once every request has ended (no lease, no client connection) and settled: whatever any
        figure still holds then was not given back by the request that took it."""
        f, start = self.figures, time.monotonic()
        while True:
            s = sampler.now()
            if s.inflight == 0 and s.queued == 0 and s.conns.get("client") == 0:
                f.idle_after_s = round(time.monotonic() - start, 1)
                break
            if time.monotonic() - start > QUIET_WITHIN:
                return s
            time.sleep(0.5)
        time.sleep(SETTLE_AFTER_IDLE)
        rest = sampler.now()
        if not at_rest(rest):
            # How long it was held beyond its request: a slot only its lease frees, say.
            held_from = time.monotonic()
            while time.monotonic() - held_from < QUIET_WITHIN:
                time.sleep(1.0)
                if at_rest(sampler.now()):
                    f.released_late_after_s = round(time.monotonic() - held_from + SETTLE_AFTER_IDLE, 1)
                    break
        return rest

    def _locust(self, gateway: SoakGateway, ring: KeyRing) -> subprocess.Popen[bytes]:
        total = sum(self.users.values())
        env = {
            **os.environ,
            "SOAK_KEY": ring.canary[0],
            "SOAK_TIGHT_KEY": ring.tight[0],
            "SOAK_MODEL": self._model_name(),
            "SOAK_CANARY": self.canary,
            "SOAK_RECORDS": str(self.folder / "requests.jsonl"),
            "SOAK_MAX_REQUESTS": str(int(MAX_REQUESTS_PER_SECOND * (self.duration + OVERTIME))),
            "SOAK_CANCEL": str(CANCEL_SHARE),
            "SOAK_SLOW_USERS": str(self.users["slow"]),
            "SOAK_TIGHT_USERS": str(self.users["tight"]),
            "SOAK_SEED": "0",
        }
        argv = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--host",
            gateway.url,
            "-u",
            str(total),
            "-r",
            str(max(1, total // 5)),
            # A bound only: the soak stops Locust itself (see _run_load).
            "-t",
            f"{int(self.duration + OVERTIME + 60)}s",
            "--stop-timeout",
            str(STOP_TIMEOUT),
            "--only-summary",
            "--loglevel",
            "WARNING",
            "--exit-code-on-error",
            "0",
        ]
        with (self.folder / "locust.log").open("wb") as log:
            return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def _model_name(self) -> str:
        from serve.config.model_file import load_model_file

        return load_model_file(Path(self.engine.model_file)).name

    def _judge(self, gateway: SoakGateway | None, ring: KeyRing, sampler: Sampler) -> None:
        f, samples = self.figures, sampler.samples
        windows: list[Window] = self.faults.windows
        base, rest, end = self.baseline, self.rest, self.end
        load = [s for s in samples if self.load_start <= s.t <= self.load_end]
        f.rss_baseline_mib = mib(base.rss)
        warm = self.load_start + self.warmup
        rss_start = median_rss(samples, warm - 5, warm)
        f.rss_start_mib, f.rss_end_mib = mib(rss_start), mib(end.rss)
        f.rss_peak_mib = mib(max((s.rss for s in samples if s.rss), default=None))
        if rss_start is not None and end.rss is not None:
            f.rss_growth_mib = mib(end.rss - rss_start)
        f.fds_baseline, f.fds_end = base.fds, end.fds
        f.fds_peak = max((s.fds for s in samples if s.fds is not None), default=None)
        f.conns_baseline, f.conns_end = base.conns, end.conns
        f.fd_kinds_baseline, f.fd_kinds_end = base.fd_kinds, end.fd_kinds
        f.series_baseline, f.series_end = base.series, end.series
        f.series_peak = max((s.series for s in samples if s.series is not None), default=None)
        f.inflight_peak = max((s.inflight for s in load if s.inflight is not None), default=None)
        f.engine_running_peak = max((s.engine_running for s in load if s.engine_running is not None), default=None)
        f.engine_waiting_peak = max((s.engine_waiting for s in load if s.engine_waiting is not None), default=None)
        f.queue_depth_peak = max((s.queued for s in load if s.queued is not None), default=None)
        f.load_s = round(self.load_end - self.load_start, 1)
        f.final = {
            "gateway_inflight": rest.inflight,
            "gateway_queued": rest.queued,
            "engine_running": rest.engine_running,
            "engine_waiting": rest.engine_waiting,
            "limiter_slots": rest.slots,
            "endpoints_up": rest.endpoints_up,
        }
        f.errors_by_reason = error_reasons(base, end)
        f.errors_outside_faults = errors_outside(samples, windows)
        f.faults = [
            {"kind": w.kind, "at_s": round(w.start - self.load_start, 1), "back_after_s": _after(w)} for w in windows
        ]
        f.fault_error = repr(self.faults.error) if self.faults.error else None
        f.key_rounds = [asdict(r) for r in ring.rounds]
        records = read_jsonl(self.folder / "requests.jsonl")
        view = client_view(records, windows)
        f.requests_sent, f.requests_done = len(records), view.done
        recovered = self.faults.recovered_at
        if recovered is not None:
            f.served_after_faults = sum(1 for r in records if r["outcome"] == "ok" and r["t0"] > recovered + GRACE)
        f.client_outcomes = view.outcomes
        f.client_failures_by_fault, f.client_failures_unexplained = view.by_fault, view.unexplained
        if gateway is not None:
            access = read_jsonl(gateway.access_log)
            errors = server_errors(access, gateway.log, windows)
            f.server_5xx_by_fault, f.server_5xx_unexplained = errors.by_fault, errors.unexplained
            f.gateway_tracebacks = tracebacks(gateway.log)
            f.keys_reloads_logged = gateway.log.read_text(errors="replace").count("keys file reloaded")
        needles = {"canary prompt": self.canary, "engine key": self.engine.key, "metrics key": self.metrics_key}
        needles |= {f"api key {i}": plain for i, plain in enumerate(ring.secrets)}
        files = [p for p in self.folder.rglob("*") if p.is_file()] + [p for p in self.engine.logs if p.is_file()]
        f.canary_hits = canary_hits(files, needles)


def _after(w: Window) -> float | None:
    return None if w.back is None else round(w.back - w.start, 1)
