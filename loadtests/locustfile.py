"""Locust scenarios for OpenAI-compatible LLM servers: closed-loop users or open-loop arrivals, timed per token.

    LOADTEST_API_KEY="$(cat .llmserve/dev-key)" python -m locust -f loadtests/locustfile.py --headless \
        --host http://127.0.0.1:8000 -u 8 -r 8 -t 60s --scenario chat

Every option also reads an environment variable (LOADTEST_SCENARIO, LOADTEST_API_KEY, ...; see --help); they are
declared in loadtests/config.py. Open loop: `--rate 4 --arrival poisson -u 1` (one user dispatches every request
on time, or counts it late). `llmserve bench run` runs this file headless and turns the records (`--records`) into
a report; `llmserve bench ui` runs it with Locust's web UI.
"""

from __future__ import annotations

import itertools
import json
import resource
import time
from typing import Any

import gevent
from gevent.pool import Pool
from locust import FastHttpUser, constant, events, task
from locust.contrib.fasthttp import FastHttpSession
from locust.exception import StopUser
from locust.user.task import LOCUST_STATE_STOPPING

from loadtests.accounting import RequestRecord
from loadtests.client import send
from loadtests.config import LoadConfig, LocustRun, add_locust_options, default_model_name, from_args, parse_sampling
from loadtests.scenarios import Lengths, RequestSpec, stream
from loadtests.shapes import arrival_offsets


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    add_locust_options(parser, (LoadConfig, LocustRun))


@events.init.add_listener
def on_init(environment: Any, **_: Any) -> None:
    # gevent's loop caches its clock between iterations, and Locust's start-up (imports, no iteration) leaves it a
    # second or more stale: the run-time timer Locust sets next would fire that much early and cut the window.
    gevent.get_hub().loop.update_now()


class Plan:
    """The requests of this run, where their records go and how far it got; built at every test start."""

    def __init__(self, environment: Any) -> None:
        o = environment.parsed_options
        self.environment = environment
        self.config = c = from_args(LoadConfig, o, locust=True)
        self.run = run = from_args(LocustRun, o, locust=True)
        lengths = Lengths(c.input_len, c.output_len, c.max_output_len, run.max_model_len, c.output_spread or 0.0)
        model = run.model or default_model_name()
        # Made as they are taken, then reused: the same index is the same request on every target.
        self.pending = stream(
            c.scenario,
            model,
            c.pool_size,
            c.seed,
            lengths,
            ignore_eos=c.ignore_eos,
            sampling=parse_sampling(run.sampling),
        )
        self.specs: list[RequestSpec] = []
        self.extra = {"cache_salt": run.salt} if run.salt else {}
        self.counter = itertools.count()
        self.started = time.time()
        # Requests sent (open loop: due) from here on are measured; --num-requests counts them.
        self.measure_from = self.started + c.warmup
        self.sent = 0
        self.done = 0
        self.measured_done = 0
        # Output so far: usage of finished requests, plus one token per output event of the running ones.
        self.output_events = 0
        self.finished_tokens = 0
        self.finished_events = 0
        self.quitting = False
        self.dispatching = False
        self.out = open(run.records, "a", buffering=1) if run.records else None  # noqa: SIM115 (closed on test_stop)

    def take(self) -> tuple[RequestSpec, int] | None:
        """The next request in the seeded sequence, or None once --max-requests have been sent."""
        limit = self.config.max_requests
        if self.quitting or (limit is not None and self.sent >= limit):
            self.stop()
            return None
        index = next(self.counter)
        self.sent += 1
        if index < self.config.pool_size:
            self.specs.append(next(self.pending))
        return self.specs[index % self.config.pool_size], index

    def stop(self) -> None:
        if self.quitting:
            return
        self.quitting = True
        runner = self.environment.runner
        # In its own greenlet: the runner stops users gracefully, and the caller is one of them. With the web UI the
        # test stops and the UI stays.
        gevent.spawn(runner.quit if self.environment.web_ui is None else runner.stop)

    def fire(self, kind: str, name: str, ms: float, failure: str | None) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=ms,
            response_length=0,
            exception=Exception(failure) if failure else None,
            context={},
        )

    def output(self) -> None:
        self.output_events += 1

    def finished(self, record: RequestRecord) -> None:
        self.done += 1
        self.finished_tokens += (record.completion_tokens or 0) if record.ok else 0
        self.finished_events += len(record.chunk_times)
        self.write(record)
        sent_at = record.scheduled if record.scheduled is not None else record.start
        if not record.cancelled and sent_at >= self.measure_from:
            self.measured_done += 1
            wanted = self.config.num_requests
            if wanted is not None and self.measured_done >= wanted:
                self.stop()

    def progress(self) -> dict[str, Any]:
        return {
            "type": "progress",
            "t": time.time(),
            "sent": self.sent,
            "done": self.done,
            "measured_done": self.measured_done,
            "output_tokens": self.finished_tokens + self.output_events - self.finished_events,
        }

    def write(self, data: dict[str, Any] | RequestRecord) -> None:
        if self.out is None:
            return
        if isinstance(data, RequestRecord):
            self.out.write('{"type":"request",' + data.to_json()[1:] + "\n")
        else:
            self.out.write(json.dumps(data) + "\n")

    def send(self, session: Any, spec: RequestSpec, index: int, scheduled: float | None = None) -> None:
        send(
            session,
            spec,
            self.run.api_key,
            index,
            scheduled=scheduled,
            extra=self.extra,
            fire=self.fire,
            done=self.finished,
            on_output=self.output,
        )


PLAN: Plan | None = None


def plan() -> Plan:
    assert PLAN is not None, "the plan is built when the test starts"
    return PLAN


def report_progress(p: Plan) -> None:
    while p.out is not None:
        gevent.sleep(p.run.progress_every)
        p.write(p.progress())


@events.test_start.add_listener
def on_test_start(environment: Any, **_: Any) -> None:
    global PLAN
    PLAN = p = Plan(environment)
    c = p.config
    p.write({"type": "start", "t": p.started, "scenario": c.scenario, "arrival": c.arrival, "rate": p.run.rate})
    if p.out is not None:
        gevent.spawn(report_progress, p)
    if c.warmup > 0 and environment.stats is not None:
        # Locust's own table excludes the warm-up too (`llmserve bench` filters the records itself).
        gevent.spawn_later(c.warmup, environment.stats.reset_all)


@events.test_stopping.add_listener
def on_test_stopping(environment: Any, **_: Any) -> None:
    if PLAN is not None:
        PLAN.write({"type": "stopping", "t": time.time()})


@events.test_stop.add_listener
def on_test_stop(environment: Any, **_: Any) -> None:
    if PLAN is None:
        return
    cpu_warning = bool(getattr(environment.runner, "cpu_warning_emitted", False))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    PLAN.write({**PLAN.progress(), "type": "stop", "loadgen_cpu_warning": cpu_warning, "cpu_s": cpu})
    if PLAN.out is not None:
        PLAN.out.close()
        PLAN.out = None


class LLMUser(FastHttpUser):
    """Closed loop: each user sends its next request as soon as the previous one ends."""

    wait_time = constant(0)
    connection_timeout = 10.0

    def on_start(self) -> None:
        # Queued requests on a saturated server legitimately wait minutes for their first byte.
        self.client = self.session(concurrency=1)

    def session(self, concurrency: int) -> FastHttpSession:
        return FastHttpSession(
            self.host,
            request_event=self.environment.events.request,
            user=self,
            concurrency=concurrency,
            network_timeout=plan().config.request_timeout,
            connection_timeout=self.connection_timeout,
        )

    @task
    def one_request(self) -> None:
        p = plan()
        if p.run.rate is not None:
            self.dispatch(p)
            return
        taken = p.take()
        if taken is None:
            raise StopUser()
        p.send(self.client, *taken)

    def dispatch(self, p: Plan) -> None:
        """Open loop: send each request when it is due; when --max-in-flight are running it goes out late and is
        recorded with its due time, so the delay shows instead of being silently absorbed."""
        if p.dispatching:
            raise StopUser()  # one dispatcher per process; extra users have nothing to do
        p.dispatching = True
        c, rate = p.config, p.run.rate or 0.0
        session = self.session(concurrency=c.max_in_flight)
        pool = Pool(c.max_in_flight)
        start_wall, start = time.time(), time.perf_counter()
        for offset in arrival_offsets(rate, c.arrival, c.seed):
            while self._state != LOCUST_STATE_STOPPING and (delay := start + offset - time.perf_counter()) > 0:
                gevent.sleep(min(delay, 0.5))
            if self._state == LOCUST_STATE_STOPPING:
                break
            pool.wait_available()
            taken = p.take()
            if taken is None:
                break
            pool.spawn(p.send, session, taken[0], taken[1], start_wall + offset)
        pool.join()
        raise StopUser()
