"""Locust scenarios for OpenAI-compatible LLM servers: closed-loop users or open-loop arrivals, timed per token.

    python -m locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 -u 8 -r 8 -t 60s \
        --api-key "$(cat .llmserve/dev-key)" --model smollm2-135m-instruct --scenario chat

Every option also reads an environment variable (LOADTEST_SCENARIO, LOADTEST_API_KEY, ...; see --help).
Open loop: `--arrival poisson --rate 4 -u 1` (one user dispatches every request on time, or counts it late).
`llmserve bench` runs this file headless and turns the records (`--records`) into a report.
"""

from __future__ import annotations

import itertools
import json
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
from loadtests.scenarios import Lengths, RequestSpec, generate, scenario_names
from loadtests.shapes import ARRIVALS, arrival_offsets


def optional_int(value: str) -> int | None:
    return int(value) if value not in ("", "0", "none") else None


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    g = parser
    g.add_argument("--api-key", env_var="LOADTEST_API_KEY", default="", is_secret=True, help="Bearer key")
    g.add_argument("--model", env_var="LOADTEST_MODEL", default="smollm2-135m-instruct", help="served model name")
    g.add_argument("--scenario", env_var="LOADTEST_SCENARIO", default="chat", choices=scenario_names())
    g.add_argument("--seed", env_var="LOADTEST_SEED", type=int, default=0, help="same seed, same requests")
    g.add_argument("--pool-size", env_var="LOADTEST_POOL_SIZE", type=int, default=2000, help="distinct requests")
    g.add_argument("--input-len", env_var="LOADTEST_INPUT_LEN", type=optional_int, default=None)
    g.add_argument("--output-len", env_var="LOADTEST_OUTPUT_LEN", type=optional_int, default=None)
    g.add_argument("--max-output-len", env_var="LOADTEST_MAX_OUTPUT_LEN", type=optional_int, default=None)
    g.add_argument("--max-model-len", env_var="LOADTEST_MAX_MODEL_LEN", type=optional_int, default=None)
    g.add_argument("--ignore-eos", env_var="LOADTEST_IGNORE_EOS", type=int, default=1, help="1: exact lengths")
    g.add_argument(
        "--sampling", env_var="LOADTEST_SAMPLING", type=json.loads, default={"temperature": 0.7}, help="JSON object"
    )
    g.add_argument("--cache-salt", env_var="LOADTEST_CACHE_SALT", default="", help="vLLM prefix-cache salt")
    g.add_argument("--arrival", env_var="LOADTEST_ARRIVAL", default="closed", choices=ARRIVALS)
    g.add_argument("--rate", env_var="LOADTEST_RATE", type=float, default=1.0, help="open loop: requests/s")
    g.add_argument("--max-in-flight", env_var="LOADTEST_MAX_IN_FLIGHT", type=int, default=256)
    g.add_argument("--max-requests", env_var="LOADTEST_MAX_REQUESTS", type=optional_int, default=None)
    g.add_argument("--warmup", env_var="LOADTEST_WARMUP", type=float, default=0.0, help="s excluded from stats")
    g.add_argument("--request-timeout", env_var="LOADTEST_REQUEST_TIMEOUT", type=float, default=900.0)
    g.add_argument("--records", env_var="LOADTEST_RECORDS", default="", help="JSON lines file, one per request")


class Plan:
    """The requests of this run and where their records go; built once per Locust process."""

    def __init__(self, environment: Any) -> None:
        o = environment.parsed_options
        self.environment = environment
        self.options = o
        lengths = Lengths(o.input_len, o.output_len, o.max_output_len, o.max_model_len)
        self.specs: list[RequestSpec] = generate(
            o.scenario, o.model, o.pool_size, o.seed, lengths, ignore_eos=bool(o.ignore_eos), sampling=o.sampling
        )
        self.extra = {"cache_salt": o.cache_salt} if o.cache_salt else {}
        self.counter = itertools.count()
        self.sent = 0
        self.quitting = False
        self.dispatching = False
        self.out = open(o.records, "a", buffering=1) if o.records else None  # noqa: SIM115 (closed on test_stop)

    def take(self) -> tuple[RequestSpec, int] | None:
        """The next request in the seeded sequence, or None once --max-requests have been sent."""
        limit = self.options.max_requests
        if limit is not None and self.sent >= limit:
            if not self.quitting:
                self.quitting = True
                # In its own greenlet: the runner stops users gracefully, and this user is one of them.
                gevent.spawn(self.environment.runner.quit)
            return None
        index = next(self.counter)
        self.sent += 1
        return self.specs[index % len(self.specs)], index

    def fire(self, kind: str, name: str, ms: float, failure: str | None) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=ms,
            response_length=0,
            exception=Exception(failure) if failure else None,
            context={},
        )

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
            self.options.api_key,
            index,
            scheduled=scheduled,
            extra=self.extra,
            fire=self.fire,
            done=self.write,
        )


PLAN: Plan | None = None


def plan() -> Plan:
    assert PLAN is not None, "the plan is built when the test starts"
    return PLAN


@events.test_start.add_listener
def on_test_start(environment: Any, **_: Any) -> None:
    global PLAN
    PLAN = Plan(environment)
    o = environment.parsed_options
    PLAN.write({"type": "start", "t": time.time(), "scenario": o.scenario, "arrival": o.arrival, "rate": o.rate})
    if o.warmup > 0 and environment.stats is not None:
        # Locust's own table excludes the warm-up too (`llmserve bench` filters the records itself).
        gevent.spawn_later(o.warmup, environment.stats.reset_all)


@events.test_stopping.add_listener
def on_test_stopping(environment: Any, **_: Any) -> None:
    if PLAN is not None:
        PLAN.write({"type": "stopping", "t": time.time()})


@events.test_stop.add_listener
def on_test_stop(environment: Any, **_: Any) -> None:
    if PLAN is None:
        return
    cpu_warning = bool(getattr(environment.runner, "cpu_warning_emitted", False))
    PLAN.write({"type": "stop", "t": time.time(), "loadgen_cpu_warning": cpu_warning})
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
            network_timeout=self.environment.parsed_options.request_timeout,
            connection_timeout=self.connection_timeout,
        )

    @task
    def one_request(self) -> None:
        p = plan()
        if p.options.arrival != "closed":
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
        o = p.options
        session = self.session(concurrency=o.max_in_flight)
        pool = Pool(o.max_in_flight)
        start_wall, start = time.time(), time.perf_counter()
        for offset in arrival_offsets(o.rate, o.arrival, o.seed):
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
