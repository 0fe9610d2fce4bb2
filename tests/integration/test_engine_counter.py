"""The engines' token counter read over HTTP while a level runs (a stand-in engine whose counter grows steadily)."""

from __future__ import annotations

import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from loadtests.engine_counter import CPU_COUNTER, CounterWatch
from loadtests.stats import Window
from tests.servers import run_server

RATE = 200.0  # tokens/s the stand-in engine's counter grows by


def engine(started: float, seen: list[str | None]) -> Starlette:
    async def metrics(request: Request) -> Response:
        seen.append(request.headers.get("authorization"))
        value = RATE * (time.time() - started)
        return PlainTextResponse(
            f'vllm:generation_tokens_total{{engine="0",model_name="m"}} {value}\n'
            f"{CPU_COUNTER} {value / RATE / 10}\n"  # a process using a tenth of a core
        )

    return Starlette(routes=[Route("/metrics", metrics)])


def watched(watch: CounterWatch) -> Window:
    """Runs the watch over a second's window with samples on both sides of it; the window."""
    watch.start()
    time.sleep(0.3)
    t0 = time.time()
    time.sleep(1.0)
    t1 = time.time()
    time.sleep(0.3)
    watch.stop()
    return Window(t0, t1)


def test_the_counter_is_read_over_a_window_while_it_runs() -> None:
    seen: list[str | None] = []
    with run_server(engine(time.time(), seen)) as url:
        watch = CounterWatch((f"{url}/metrics", f"{url}/metrics"), key="k", interval=0.1)
        window = watched(watch)
    assert watch.failed is None and len(watch.samples) >= 10
    # Two engines (the same one twice here): their counts add up.
    tokens = watch.grown(window)
    assert tokens == pytest.approx(2 * RATE * window.seconds, rel=0.05)
    assert set(seen) == {"Bearer k"}
    # Past the last sample there is no figure.
    assert watch.grown(Window(window.t0, time.time() + 5)) is None


def test_an_unreachable_engine_is_said_not_guessed() -> None:
    watch = CounterWatch(("http://127.0.0.1:9/metrics",), interval=0.1).start()
    time.sleep(0.3)
    watch.stop()
    assert watch.samples == [] and watch.failed is not None and "127.0.0.1:9" in watch.failed
    assert watch.grown(Window(time.time() - 1, time.time())) is None


def test_another_counter_is_read_by_its_name() -> None:
    with run_server(engine(time.time(), [])) as url:
        watch = CounterWatch((f"{url}/metrics",), name=CPU_COUNTER, interval=0.1)
        window = watched(watch)
        absent = CounterWatch((f"{url}/metrics",), name="nothing_total", interval=0.1).start()
        time.sleep(0.3)
        absent.stop()
    assert watch.failed is None
    assert watch.grown(window) == pytest.approx(window.seconds / 10, rel=0.05)
    assert absent.samples == [] and absent.failed == f"{url}/metrics has no nothing_total"
