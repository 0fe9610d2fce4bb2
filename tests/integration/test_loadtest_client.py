"""The Locust streaming client against loopback servers with known delays: it must measure them, not invent them."""

from __future__ import annotations

import io
import re
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.config import LoadConfig
from loadtests.runner import Level, LevelResult, Setup, Target, run_level
from tests.integration.conftest import Gateway
from tests.integration.fake_engine import FakeEngine
from tests.integration.loadtest_servers import ScriptedEngine
from tests.servers import run_server

DELAY = 0.2  # the fake engine sleeps this long before every text event
TOKENS = 5
# Scheduling noise allowed on a busy two-core machine: Locust, the server and pytest share it.
SLACK = 0.06


@pytest.fixture
def slow_engine() -> Iterator[tuple[FakeEngine, str]]:
    engine = FakeEngine(chunks=TOKENS, delay=DELAY)
    with run_server(engine.app()) as url:
        yield engine, url


def run(tmp_path: Path, url: str, key: str | None, model: str, scenario: str = "chat", **config: object) -> LevelResult:
    settings: dict[str, object] = {
        "scenario": scenario,
        "warmup": 0.0,
        "duration": 3.0,
        "stop_timeout": 10.0,
        "output_len": TOKENS,
        "cache_salt": False,
        # No criteria: these tests look at the numbers themselves.
        "slo_ttft": None,
        "slo_tpot": None,
        "max_error_rate": None,
        **config,
    }
    level = Level(rate=settings.pop("rate")) if "rate" in settings else Level(users=2)  # type: ignore[arg-type]
    target = Target("fake", url, key, model)
    setup = Setup(LoadConfig(**settings), sampling={"temperature": 0.7})  # type: ignore[arg-type]
    return run_level(target, level, setup, tmp_path)


def assert_measures_the_delays(result: LevelResult, overhead: float = 0.0) -> None:
    """`overhead`: what a proxy in the path may add before the first token (auth, routing, a new connection)."""
    assert result.valid, result.problems
    ok = [r for r in result.records if r.ok]
    assert len(ok) >= 4, result.summary
    for r in ok:
        assert r.completion_tokens == TOKENS and r.prompt_tokens == 7  # the fake engine's usage
        assert r.ttft is not None and r.e2e is not None and r.tpot is not None
        assert len(r.itls) == TOKENS - 1
        # Lower bounds are physical: nothing can arrive before the server sent it. The first text event comes
        # after one delay (the role chunk before it is not a token), each next one a delay later. (A single gap
        # has no such bound: an event read late shortens the gap after it.)
        assert r.ttft >= DELAY - 0.01, r
        assert all(t >= (k + 1) * DELAY - 0.01 for k, t in enumerate(r.chunk_times)), r
        assert r.e2e >= TOKENS * DELAY - 0.01, r
    # Upper bounds allow for scheduling noise, on the median so that one descheduled request does not decide.
    ttft = statistics.median(r.ttft or 0 for r in ok)
    assert ttft <= DELAY + SLACK + overhead, ttft
    e2e = statistics.median(r.e2e or 0 for r in ok)
    assert e2e <= TOKENS * DELAY + 2 * SLACK + overhead, e2e
    tpot = statistics.median(r.tpot or 0 for r in ok)
    assert tpot == pytest.approx(DELAY, abs=SLACK / 2), tpot
    s = result.summary
    assert s.requests.failed == 0
    assert s.itl_s.p50 == pytest.approx(DELAY, abs=SLACK / 2), s.itl_s
    # Two users back to back can get at most 5 tokens per second each; gaps between requests cost a little.
    assert 0.6 * 2 * TOKENS / (TOKENS * DELAY) <= s.output_tok_s <= 1.05 * 2 * TOKENS / (TOKENS * DELAY)


def test_streaming_client_measures_known_delays(tmp_path: Path, slow_engine: tuple[FakeEngine, str]) -> None:
    engine, url = slow_engine
    result = run(tmp_path, url, None, "fake-model")
    assert_measures_the_delays(result)
    # The measured window is the --duration asked for, not cut by the load generator's own start-up.
    assert result.window.seconds == pytest.approx(3.0, abs=0.25), result.window
    sent = engine.requests[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == TOKENS and sent["ignore_eos"] is True
    assert (tmp_path / "raw" / "fake-u2.jsonl").exists()


def test_delays_survive_the_gateway(tmp_path: Path, gateway: Gateway) -> None:
    gateway.engine.chunks, gateway.engine.delay = TOKENS, DELAY
    result = run(tmp_path, gateway.url, gateway.key, "fake")
    assert_measures_the_delays(result, overhead=0.2)
    assert gateway.engine.headers[0]["authorization"] != f"Bearer {gateway.key}"


def test_non_streamed_requests_time_the_whole_answer(tmp_path: Path, slow_engine: tuple[FakeEngine, str]) -> None:
    result = run(tmp_path, slow_engine[1], None, "fake-model", scenario="chat-nostream")
    assert result.valid, result.problems
    ok = [r for r in result.records if r.ok]
    assert ok and all(r.ttft is None and r.completion_tokens == TOKENS for r in ok)
    assert statistics.median(r.e2e or 0 for r in ok) == pytest.approx(DELAY, abs=SLACK)
    assert result.summary.ttft_s.count == 0


def test_a_stream_delivered_in_one_piece_is_refused(tmp_path: Path) -> None:
    # No delay between events: what a buffering proxy hands to the client. ITL is zero, TTFT equals e2e.
    engine = FakeEngine(chunks=TOKENS, delay=0.0)
    with run_server(engine.app()) as url:
        result = run(tmp_path, url, None, "fake-model", duration=2.0, max_requests=30)
    assert not result.valid
    assert any("inter-token latency" in p for p in result.problems)


def test_errors_are_counted_and_break_the_threshold(tmp_path: Path) -> None:
    engine = FakeEngine(chunks=TOKENS, mode="status", status=503)
    with run_server(engine.app()) as url:
        result = run(tmp_path, url, None, "fake-model", duration=2.0, max_requests=10)
    s = result.summary
    assert s.requests.ok == 0 and s.requests.failed > 0 and s.requests.error_rate == 1.0
    assert any(msg.startswith("HTTP 503") for msg in s.errors)
    assert result.failures == [] and result.valid  # no threshold was asked for; the numbers are true


def test_open_loop_counts_requests_that_could_not_go_out_on_time(
    tmp_path: Path, slow_engine: tuple[FakeEngine, str]
) -> None:
    # 10 requests/s due, but with one request in flight at a time and 1 s per request only ~1/s can go out.
    late = run(tmp_path, slow_engine[1], None, "fake-model", rate=10.0, arrival="constant", max_in_flight=1)
    s = late.summary
    assert s.requests.late >= 1
    assert s.late_s.max is not None and s.late_s.max > 0.5
    # Latency counts from the due time: TTFT includes the wait for a free slot.
    assert s.ttft_s.max is not None and s.ttft_s.max > DELAY + 0.5
    on_time = run(tmp_path, slow_engine[1], None, "fake-model", rate=4.0, arrival="poisson", max_in_flight=64)
    assert on_time.summary.requests.late == 0
    assert on_time.summary.requests.ok >= 4
    assert on_time.valid, on_time.problems


@pytest.mark.parametrize("kind", ["tool_call", "reasoning"])
def test_first_output_of_any_kind_is_the_first_token(tmp_path: Path, kind: str) -> None:
    # The first output event comes 0.3 s after the headers, the next ones 0.6 s apart. A tool call streams no
    # content at all; a reasoning model streams its reasoning first. Either way TTFT is the first output event.
    engine = ScriptedEngine(kind=kind, chunks=4, first_delay=0.3, delay=0.6)
    with run_server(engine.app()) as url:
        result = run(tmp_path, url, None, "m", duration=4.0, max_requests=4, output_len=4)
    assert result.valid, result.problems
    ok = [r for r in result.records if r.ok]
    assert len(ok) >= 2, result.summary
    for r in ok:
        assert r.ttft is not None and r.ttft >= 0.3 - 0.01, r
        assert len(r.chunk_times) == 4 and r.chunk_times[0] == pytest.approx(r.ttft, abs=1e-5), r
    # Before the second event could have come (0.9 s): the first output, not the first content, is the first token.
    ttft = statistics.median(r.ttft or 0 for r in ok)
    assert ttft < 0.3 + 0.3, ttft
    assert result.summary.ttft_s.count == len([r for r in ok if result.window.holds(r.start)])


def test_num_requests_ends_a_level_by_count_not_time(tmp_path: Path, slow_engine: tuple[FakeEngine, str]) -> None:
    # Each request takes ~1 s; two users measure 6 requests in ~3 s after a 1 s warm-up, far inside the duration.
    result = run(tmp_path, slow_engine[1], None, "fake-model", warmup=1.0, duration=300.0, num_requests=6)
    assert result.valid, result.problems
    s = result.summary
    assert s.requests.measured >= 6 and s.samples.measured >= 6
    assert result.loadgen.wall_s < 60, result.loadgen
    # Measured means sent after the warm-up: the window starts there and ends when the 6th of them finished.
    window_start = min(r.start for r in result.records) + 1.0
    assert result.window.t0 == pytest.approx(window_start, abs=0.5)
    finished = sorted(r.start + (r.e2e or 0) for r in result.records if r.ok and r.start >= result.window.t0)
    assert result.window.t1 == pytest.approx(finished[5], abs=0.5)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_each_level_shows_live_progress(tmp_path: Path, slow_engine: tuple[FakeEngine, str]) -> None:
    out = Terminal()
    settings = LoadConfig(warmup=1.0, duration=3.0, stop_timeout=10.0, output_len=TOKENS, cache_salt=False)
    run_level(Target("fake", slow_engine[1], None, "fake-model"), Level(users=2), Setup(settings), tmp_path, out)
    lines = [line for line in out.getvalue().split("\r") if "requests done" in line]
    assert any("warm-up" in line for line in lines), lines
    assert any("/4 s," in line for line in lines), lines  # elapsed / planned (warm-up + duration)
    rates = [float(m.group(1)) for line in lines if (m := re.search(r"([\d.]+) output tok/s", line))]
    # Two users at up to 5 tokens/s each: the live rate is real, not a placeholder.
    assert rates and 0 < max(rates) <= 2 * TOKENS / (TOKENS * DELAY) * 1.5, lines
    assert any(int(m.group(1)) >= 2 for line in lines if (m := re.search(r"(\d+) requests done", line))), lines
