"""The load-test result folder and the `llmserve bench` command line: complete files, refused numbers kept out."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from loadtests import report
from loadtests.accounting import RequestRecord
from loadtests.cli import redacted_command
from loadtests.config import LoadConfig
from loadtests.quality import Answer, QualityResult
from loadtests.report import Meta
from loadtests.runner import Level, LevelResult, LoadGen
from loadtests.sanity import impossible
from loadtests.stats import SLO, Window, summarize
from serve.cli import parser


def records(n: int, gap: float, at: float = 0.0) -> list[RequestRecord]:
    return [
        RequestRecord(
            id=i,
            scenario="chat",
            stream=True,
            start=at + i,
            max_tokens=16,
            status=200,
            ttft=0.1,
            e2e=0.1 + 9 * gap,
            chunk_times=[0.1 + k * gap for k in range(10)],
            prompt_tokens=20,
            completion_tokens=10,
        )
        for i in range(n)
    ]


def result(target: str, users: int, gap: float, n: int = 20, busy: float | None = None) -> LevelResult:
    recs = records(n, gap)
    window = Window(0.0, 20.0)
    summary = summarize(recs, window, SLO(ttft=1.0))
    problems = impossible(summary, recs, ceiling=None)
    loadgen = LoadGen(exit_code=0, wall_s=25.0, cpu_s=1.0, cpu_fraction=0.04, machine_busy_before=busy)
    return LevelResult(target, Level(users=users), summary, problems, [], recs, window, loadgen)


def scored(target: str, correct: int, total: int = 40) -> QualityResult:
    answers = [Answer(f"q{i}", f"question {i}?", "x", "x" if i < correct else "y", i < correct) for i in range(total)]
    return QualityResult(target, answers, max_tokens=64)


META = Meta(title="t", command="llmserve bench compare", config=LoadConfig(warmup=5, duration=20), model="m")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    results = [
        result("baseline", 1, 0.05),
        # other work on the machine just before this run
        result("vllm", 1, 0.01, busy=0.9),
        result("gateway", 1, 0.0),  # a buffered stream: refused
        result("vllm", 8, 0.01, n=5),  # too few requests for percentiles
    ]
    quality = [scored("baseline", 30), scored("vllm", 29), scored("gateway", 27)]
    return report.write(tmp_path / "out", META, results, [("vllm", "baseline"), ("gateway", "vllm")], quality)


def test_the_folder_is_complete(folder: Path) -> None:
    for name in report.FILES:
        assert (folder / name).stat().st_size > 0, name
    for png in ("throughput.png", "latency.png", "latency_cdf.png"):
        assert (folder / png).read_bytes().startswith(b"\x89PNG")
    rows = list(csv.DictReader((folder / "requests.csv").open()))
    assert len(rows) == 65
    assert set(rows[0]) == set(report.CSV_FIELDS)
    assert rows[0]["completion_tokens"] == "10" and rows[0]["ok"] == "1"


def test_refused_numbers_stay_out_of_the_results(folder: Path) -> None:
    summary = json.loads((folder / "summary.json").read_text())
    by_target = {r["target"]: r for r in summary["results"] if r["level"]["users"] == 1}
    assert by_target["vllm"]["valid"] and by_target["vllm"]["output_tok_s"] == pytest.approx(10.0)
    gateway = by_target["gateway"]
    assert not gateway["valid"] and "output_tok_s" not in gateway and "unverified" in gateway
    assert any("inter-token latency" in p for p in gateway["problems"])
    assert summary["refused"] == 1
    # Every level here produces the same tokens/s; a refused run gets no ratio.
    assert summary["ratios"] == {"vllm/baseline": {"u1": pytest.approx(1.0)}, "gateway/vllm": {"u1": None}}
    text = (folder / "report.md").read_text()
    assert "| gateway | 1 | refused" in text
    # 10 tokens/s in every quarter of the window: no error to speak of.
    assert "| vllm | 1 | 10.0 ± 0.0 |" in text
    assert "- vllm at 1: other work kept 90% of the CPUs busy" in text
    assert "baseline at 1: other work" not in text


def waves(target: str, period: float) -> LevelResult:
    """64 users in lockstep: each cohort's 10 tokens come within the first quarter of every `period` seconds."""
    recs = [
        RequestRecord(
            id=c * 64 + u,
            scenario="chat",
            stream=True,
            start=c * period,
            max_tokens=16,
            status=200,
            ttft=0.05,
            e2e=0.95,
            chunk_times=[0.05 + k * 0.1 for k in range(10)],
            prompt_tokens=20,
            completion_tokens=10,
        )
        for c in range(int(20 / period))
        for u in range(64)
    ]
    window = Window(0.0, 20.0)
    summary = summarize(recs, window, SLO(ttft=1.0))
    loadgen = LoadGen(exit_code=0, wall_s=25.0, cpu_s=1.0, cpu_fraction=0.04)
    return LevelResult(target, Level(users=64), summary, [], [], recs, window, loadgen)


def test_throughput_that_moves_across_the_window_is_flagged_and_its_ratio_carries_the_error(tmp_path: Path) -> None:
    steady, wavy = waves("vllm", 1.0), waves("gateway", 10.0)
    # One cohort a second fills every quarter alike; one every 10 s leaves every other quarter empty.
    assert steady.summary.steadiness.steady and steady.summary.steadiness.relative == pytest.approx(0.0)
    assert wavy.summary.steadiness.quarters == (128.0, 0.0, 128.0, 0.0)
    assert not wavy.summary.steadiness.steady
    folder = report.write(tmp_path / "out", META, [steady, wavy], [("gateway", "vllm")])
    text = (folder / "report.md").read_text()
    assert "- gateway at 64: output tok/s moved across the window's quarters (128, 0, 128, 0;" in text
    assert "- vllm at 64: output tok/s moved" not in text
    # gateway/vllm = 64 / 640 = 0.1; its error is the gateway's relative error (0.577) times 0.1.
    assert "| gateway/vllm | 0.10 ± 0.06 |" in text
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["ratio_errors"]["gateway/vllm"]["u64"] == pytest.approx(0.1 * math.sqrt(1 / 3))
    flags = {r["target"]: r["steadiness"]["steady"] for r in summary["results"]}
    assert flags == {"vllm": True, "gateway": False}


def test_every_percentile_shows_its_sample_count(folder: Path) -> None:
    text = (folder / "report.md").read_text()
    # 20 requests of 10 tokens: 20 TTFTs and TPOTs, 9 gaps each between their 10 events.
    row = next(line for line in text.splitlines() if line.startswith("| vllm | 1 |"))
    assert row.count("(n=20)") == 3 and "(n=180)" in row, row


def test_a_level_with_few_samples_is_flagged_with_the_duration_that_would_do(folder: Path) -> None:
    text = (folder / "report.md").read_text()
    assert "| vllm | 8 *few samples* |" in text
    assert "| vllm | 1 |" in text  # 20 measured requests are enough
    # 5 requests in a 20 s window: 20 would take 80 s.
    assert "- vllm at 8: only 5 measured requests (fewer than 20)" in text
    assert "--duration 80 or --num-requests 20" in text
    summary = json.loads((folder / "summary.json").read_text())
    flagged = [(r["target"], r["level"]["users"]) for r in summary["results"] if r["low_samples"]]
    assert flagged == [("vllm", 8)] and summary["low_samples"] == 1
    few = next(r for r in summary["results"] if r["low_samples"])
    assert few["samples"] == {"measured": 5, "needed": 20, "suggested_duration_s": 80.0, "enough": False}


def test_the_terminal_line_of_a_level_warns_about_few_samples() -> None:
    assert "WARNING" not in report.level_line(result("vllm", 1, 0.01))
    line = report.level_line(result("vllm", 8, 0.01, n=5))
    assert "(n=5)" in line and "WARNING vllm at u8: only 5 measured requests" in line


def test_quality_is_a_column_and_a_drop_below_the_baseline_fails(folder: Path) -> None:
    text = (folder / "report.md").read_text()
    assert next(line for line in text.splitlines() if line.startswith("| baseline | 1 |")).endswith("| 30/40 |")
    assert next(line for line in text.splitlines() if line.startswith("| vllm | 1 |")).endswith("| 29/40 |")
    # 27 is more than 2 below the baseline's 30; 29 is not.
    assert "- quality: gateway answered 27/40, more than 2 below baseline's 30/40" in text
    assert "quality: vllm" not in text
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["quality"]["vllm"]["correct"] == 29 and summary["quality"]["vllm"]["total"] == 40
    assert summary["failed_criteria"] == 1


def test_keys_never_reach_the_report() -> None:
    argv = ["bench", "compare", "--engine-key", "s3cret", "--key=abc", "--users", "1,8"]
    assert redacted_command(argv) == "llmserve bench compare --engine-key '***' '--key=***' --users 1,8"


def test_bench_is_registered_on_the_cli() -> None:
    args = parser().parse_args(["bench", "compare", "--users", "1,8,32,64", "--duration", "30"])
    assert args.users == (1, 8, 32, 64) and args.duration == 30 and args.baseline_threads == 1
    run = parser().parse_args(["bench", "run", "--rates", "0.5,2", "--arrival", "constant"])
    assert run.rates == (0.5, 2.0) and run.arrival == "constant"
    with pytest.raises(SystemExit):
        parser().parse_args(["bench", "run", "--users", "0"])


def test_every_target_gets_the_model_policy_sampling() -> None:
    from loadtests.config import DEFAULT_MODEL_FILE, FALLBACK_SAMPLING, from_args, sampling
    from serve.config.model_file import load_model_file

    model = load_model_file(DEFAULT_MODEL_FILE)
    defaults = parser().parse_args(["bench", "run"])
    assert sampling(from_args(LoadConfig, defaults), model.policy.defaults) == {
        **FALLBACK_SAMPLING,
        **model.policy.defaults,
    }
    assert "top_p" not in sampling(from_args(LoadConfig, defaults), {}), "no top_p unless a file or flag sets one"
    chosen = parser().parse_args(["bench", "run", "--temperature", "0", "--top-p", "1"])
    assert sampling(from_args(LoadConfig, chosen), model.policy.defaults) == {
        **model.policy.defaults,
        "temperature": 0.0,
        "top_p": 1.0,
    }
