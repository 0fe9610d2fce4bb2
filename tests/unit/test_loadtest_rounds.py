"""A level run in rounds: windows joined, targets' order turned each round, and the engines' own token counter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtests import cli, report
from loadtests.accounting import RequestRecord
from loadtests.config import LoadConfig, from_args
from loadtests.engine_counter import counter_value, growth
from loadtests.report import Meta
from loadtests.runner import Level, LevelResult, LoadGen, Setup, Target, join_rounds
from loadtests.stats import SLO, Window, summarize
from serve.cli import parser


def streamed(rid: int, start: float, every: float, events: int = 10) -> RequestRecord:
    """A streamed request with one token per event, `every` seconds apart."""
    times = [every * (k + 1) for k in range(events)]
    return RequestRecord(
        id=rid,
        scenario="chat",
        stream=True,
        start=start,
        max_tokens=events,
        status=200,
        ttft=times[0],
        e2e=times[-1],
        chunk_times=times,
        prompt_tokens=5,
        completion_tokens=events,
    )


def test_a_joined_window_counts_its_spans_and_not_the_gap_between_them() -> None:
    window = Window.join([Window(100.0, 110.0), Window(0.0, 10.0)])
    assert window.spans == ((0.0, 10.0), (100.0, 110.0)) and window.seconds == 20.0
    assert window.holds(5.0) and window.holds(105.0) and not window.holds(50.0)
    # Events 1 s apart from a second after the start: 9 of 10 inside each span (the 10th falls on its end), and
    # the 10 of the request in the gap between them must not count.
    records = [streamed(1, 0.0, 1.0), streamed(2, 45.0, 1.0), streamed(3, 100.0, 1.0)]
    s = summarize(records, window, SLO())
    assert s.output_tok_s == pytest.approx((9 + 9) / 20)
    assert s.requests.started == 2  # the request started in the gap is not one of the window's
    # Four quarters per span: the drift between rounds is in the spread.
    assert len(s.steadiness.quarters) == 8


def test_prometheus_counter_is_summed_over_label_sets_and_nothing_else() -> None:
    text = "\n".join(
        [
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            'vllm:generation_tokens_total{engine="0",model_name="m"} 1200.0',
            'vllm:generation_tokens_total{engine="1",model_name="m"} 34.0',
            'vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9',
            'vllm:generation_tokens_total_extra{engine="0"} 99.0',
        ]
    )
    assert counter_value(text) == 1234.0
    assert counter_value("vllm:prompt_tokens_total 5.0") is None


def test_tokens_over_a_window_interpolate_between_samples() -> None:
    samples = [(0.0, 0.0), (2.0, 100.0), (4.0, 100.0), (6.0, 300.0)]
    assert growth(samples, Window(1.0, 5.0)) == pytest.approx(50.0 + 100.0)
    assert growth(samples, Window(0.0, 1.0, ((5.0, 6.0),))) == pytest.approx(50.0 + 100.0)
    assert growth(samples, Window(1.0, 7.0)) is None  # not covered: no figure rather than a wrong one
    assert growth([(0.0, 500.0), (2.0, 10.0)], Window(0.5, 1.5)) is None  # the engine restarted


def level(
    target: str,
    at: float,
    every: float,
    engine: float | None,
    problems: list[str] | None = None,
    cpu: tuple[float | None, str | None] = (None, None),
) -> LevelResult:
    records = [streamed(i, at + i, every) for i in range(20)]
    window = Window(at, at + 20.0)
    summary = summarize(records, window, SLO())
    loadgen = LoadGen(exit_code=0, wall_s=30.0, cpu_s=3.0, cpu_fraction=0.1, machine_busy_before=0.05)
    return LevelResult(
        target, Level(users=8), summary, problems or [], [], records, window, loadgen, engine, None, *cpu
    )


def test_rounds_join_into_one_result_over_both_windows() -> None:
    first, second = level("vllm", 0.0, 0.5, 200.0), level("vllm", 1000.0, 1.0, 100.0, ["a problem"])
    joined = join_rounds([first, second], Setup(LoadConfig(rounds=2)))
    assert joined.window.spans == ((0.0, 20.0), (1000.0, 1020.0))
    assert len(joined.records) == 40 and joined.summary.samples.measured == 40
    # Tokens over both spans: the mean of the rounds' rates, weighted by their seconds.
    rate = (first.summary.output_tok_s + second.summary.output_tok_s) / 2
    assert joined.summary.output_tok_s == pytest.approx(rate)
    assert joined.engine_tok_s == pytest.approx(300.0 / 40.0)
    assert joined.problems == ["round 2: a problem"] and not joined.valid
    # One round without the engine's count: the joined level has none either, rather than half of one.
    assert join_rounds([first, level("vllm", 1000.0, 1.0, None)], Setup()).engine_tokens is None


def test_sweep_turns_the_order_each_round_and_joins_each_targets_rounds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ran: list[tuple[str, int, int]] = []

    def run_level(target: Target, lv: Level, setup: Setup, folder: Path, round_no: int = 1) -> LevelResult:
        ran.append((target.name, lv.users or 0, round_no))
        return level(target.name, 100.0 * len(ran), 0.5, 10.0)

    monkeypatch.setattr("loadtests.runner.run_level", run_level)
    targets = [Target(name, "http://127.0.0.1:1", None, "m") for name in ("baseline", "vllm", "gateway")]
    results = cli.sweep(targets, Setup(LoadConfig(users=(1, 8), rounds=2)), tmp_path)
    assert ran == [
        ("baseline", 1, 1),
        ("vllm", 1, 1),
        ("gateway", 1, 1),
        ("gateway", 1, 2),
        ("vllm", 1, 2),
        ("baseline", 1, 2),
        ("baseline", 8, 1),
        ("vllm", 8, 1),
        ("gateway", 8, 1),
        ("gateway", 8, 2),
        ("vllm", 8, 2),
        ("baseline", 8, 2),
    ]
    assert [r.target for r in results] == ["baseline", "vllm", "gateway"] * 2
    assert all(len(r.window.spans) == 2 for r in results)


def test_compare_runs_two_rounds_by_default_and_rounds_must_be_positive() -> None:
    assert from_args(LoadConfig, parser().parse_args(["bench", "compare"])).rounds == 2
    assert from_args(LoadConfig, parser().parse_args(["bench", "run"])).rounds == 1
    with pytest.raises(SystemExit):
        parser().parse_args(["bench", "run", "--rounds", "0"])


def test_the_report_shows_the_engines_count_and_its_ratio_beside_the_clients(tmp_path: Path) -> None:
    results = [level("vllm", 0.0, 0.5, 400.0), level("gateway", 100.0, 0.5, 390.0)]
    meta = Meta(title="t", command="llmserve bench compare", config=LoadConfig(), model="m")
    folder = report.write(tmp_path / "out", meta, results, [("gateway", "vllm")])
    summary: dict[str, Any] = json.loads((folder / "summary.json").read_text())
    assert summary["ratios"]["gateway/vllm (engine's count)"]["u8"] == pytest.approx(390.0 / 400.0)
    assert summary["ratios"]["gateway/vllm"]["u8"] == pytest.approx(1.0)
    assert "gateway/vllm (engine's count)" not in summary["ratio_errors"]
    assert [r["engine_tok_s"] for r in summary["results"]] == [pytest.approx(20.0), pytest.approx(19.5)]
    text = (folder / "report.md").read_text()
    assert "| output tok/s | engine's count | total tok/s |" in text
    assert "| gateway/vllm (engine's count) | 0.97 |" in text
    assert "(engine's count 20.0)" in report.level_line(results[0], "round 1 of 2")


def test_an_unread_counter_is_said_and_does_not_refuse_the_clients_numbers(tmp_path: Path) -> None:
    broken = level("vllm", 0.0, 0.5, None)
    broken.engine_problem = "the engines' token counter could not be read over the window: no samples"
    assert broken.valid
    assert "WARNING vllm at u8: the engines' token counter could not be read" in report.level_line(broken)
    meta = Meta(title="t", command="c", config=LoadConfig(), model="m")
    text = (report.write(tmp_path / "out", meta, [broken]) / "report.md").read_text()
    assert "- vllm at 8: the engines' token counter could not be read over the window" in text


def test_the_gateways_cpu_is_joined_over_rounds_and_reported_per_level(tmp_path: Path) -> None:
    first, second = (
        level("gateway", 0.0, 0.5, 400.0, cpu=(0.2, None)),
        level("gateway", 100.0, 0.5, 400.0, cpu=(0.6, None)),
    )
    joined = join_rounds([first, second], Setup(LoadConfig(rounds=2)))
    # 0.8 CPU seconds over 40 s of windows: 2% of a core, over the client's 20 tok/s x 40 s = 800 tokens.
    assert joined.gateway_cpu_s == pytest.approx(0.8) and joined.gateway_cpu_share == pytest.approx(0.02)
    assert joined.gateway_cpu_per_token == pytest.approx(0.8 / (joined.summary.output_tok_s * 40.0))
    unread = level("gateway", 100.0, 0.5, 400.0, cpu=(None, "the gateway's CPU counter could not be read: x"))
    rejoined = join_rounds([first, unread], Setup(LoadConfig(rounds=2)))
    assert rejoined.gateway_cpu_s is None and rejoined.gateway_cpu_problem == (
        "round 2: the gateway's CPU counter could not be read: x"
    )
    meta = Meta(title="t", command="llmserve bench compare", config=LoadConfig(), model="m")
    folder = report.write(tmp_path / "out", meta, [level("vllm", 200.0, 0.5, 400.0), joined], [("gateway", "vllm")])
    rows = json.loads((folder / "summary.json").read_text())["results"]
    assert [r["gateway_cpu_share"] for r in rows] == [None, pytest.approx(0.02)]
    text = (folder / "report.md").read_text()
    per_k = 1e6 * 0.8 / (joined.summary.output_tok_s * 40.0)
    assert "| % of one core | 2.0 |" in text and f"| CPU ms per 1000 output tokens | {per_k:.1f} |" in text
    assert "gateway CPU 2.0% of a core" in report.level_line(joined)
    assert "round 2: the gateway's CPU counter could not be read: x" in report.level_line(rejoined)
