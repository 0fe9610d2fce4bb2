"""The load-test result folder and the `llmserve bench` command line: complete files, refused numbers kept out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loadtests import report
from loadtests.accounting import RequestRecord
from loadtests.cli import redacted_command
from loadtests.runner import Level, LevelResult, LoadConfig, describe
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


def result(target: str, users: int, gap: float) -> LevelResult:
    recs = records(20, gap)
    window = Window(0.0, 20.0)
    summary = summarize(recs, window, SLO(ttft=1.0))
    problems = impossible(summary, recs, ceiling=None)
    loadgen = {"exit_code": 0, "wall_s": 25.0, "cpu_s": 1.0, "cpu_fraction": 0.04, "cpu_warning": False}
    return LevelResult(target, Level(users=users), summary, problems, [], recs, window, loadgen)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    results = [
        result("baseline", 1, 0.05),
        result("vllm", 1, 0.01),
        result("gateway", 1, 0.0),  # a buffered stream: refused
    ]
    results[1].loadgen["machine_busy_before"] = 0.9  # other work on the machine just before this run
    meta = {"title": "t", "command": "llmserve bench compare", "config": describe(LoadConfig(warmup=5, duration=20))}
    return report.write(tmp_path / "out", meta, results, [("vllm", "baseline"), ("gateway", "vllm")])


def test_the_folder_is_complete(folder: Path) -> None:
    for name in report.FILES:
        assert (folder / name).stat().st_size > 0, name
    for png in ("throughput.png", "latency.png", "latency_cdf.png"):
        assert (folder / png).read_bytes().startswith(b"\x89PNG")
    rows = list(csv.DictReader((folder / "requests.csv").open()))
    assert len(rows) == 60
    assert set(rows[0]) == set(report.CSV_FIELDS)
    assert rows[0]["completion_tokens"] == "10" and rows[0]["ok"] == "1"


def test_refused_numbers_stay_out_of_the_results(folder: Path) -> None:
    summary = json.loads((folder / "summary.json").read_text())
    by_target = {r["target"]: r for r in summary["results"]}
    assert by_target["vllm"]["valid"] and by_target["vllm"]["output_tok_s"] == pytest.approx(10.0)
    gateway = by_target["gateway"]
    assert not gateway["valid"] and "output_tok_s" not in gateway and "unverified" in gateway
    assert any("inter-token latency" in p for p in gateway["problems"])
    assert summary["refused"] == 1
    # Every level here produces the same tokens/s; a refused run gets no ratio.
    assert summary["ratios"] == {"vllm/baseline": {"u1": pytest.approx(1.0)}, "gateway/vllm": {"u1": None}}
    text = (folder / "report.md").read_text()
    assert "| gateway | 1 | refused" in text
    assert "| vllm | 1 | 10.0 |" in text
    assert "- vllm at 1: other work kept 90% of the CPUs busy" in text
    assert "baseline at 1: other work" not in text


def test_keys_never_reach_the_report() -> None:
    argv = ["bench", "compare", "--engine-key", "s3cret", "--key=abc", "--users", "1,8"]
    assert redacted_command(argv) == "llmserve bench compare --engine-key '***' '--key=***' --users 1,8"


def test_bench_is_registered_on_the_cli() -> None:
    args = parser().parse_args(["bench", "compare", "--users", "1,8,32,64", "--duration", "30"])
    assert args.users == [1, 8, 32, 64] and args.duration == 30 and args.baseline_threads == 1
    run = parser().parse_args(["bench", "run", "--rates", "0.5,2", "--arrival", "constant"])
    assert run.rates == [0.5, 2.0] and run.arrival == "constant"
    with pytest.raises(SystemExit):
        parser().parse_args(["bench", "run", "--users", "0"])


def test_every_target_gets_the_model_policy_sampling() -> None:
    from loadtests.cli import DEFAULT_MODEL_FILE, sampling
    from serve.config.model_file import load_model_file

    model = load_model_file(DEFAULT_MODEL_FILE)
    defaults = parser().parse_args(["bench", "run"])
    assert sampling(defaults, model) == {"temperature": 0.7, **model.policy.defaults}
    assert "top_p" not in sampling(defaults, model), "the default model file sets no top_p"
    chosen = parser().parse_args(["bench", "run", "--temperature", "0", "--top-p", "1"])
    assert sampling(chosen, model) == {**model.policy.defaults, "temperature": 0.0, "top_p": 1.0}
