"""The report of a tenants run: a row per tenant over the shared window, the sum of all, plots over time."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loadtests import report
from loadtests.accounting import RequestRecord
from loadtests.config import LoadConfig
from loadtests.report import Meta
from loadtests.runner import Level, LevelResult, LoadGen
from loadtests.sanity import impossible
from loadtests.stats import SLO, Window, summarize
from loadtests.tenant_plots import MIN_BIN_S, bins, output_rates
from loadtests.tenants import resolve_tenants

EXAMPLE = Path(__file__).resolve().parents[2] / "loadtests" / "data" / "tenants-noisy-quiet.yaml"
WINDOW = Window(10.0, 30.0)


def records(n: int, every: float, tokens: int, ttft: float, gap: float = 0.01) -> list[RequestRecord]:
    """`n` requests `every` seconds apart from t=10, each streaming `tokens` events `gap` apart after `ttft`."""
    out = []
    for i in range(n):
        times = [ttft + k * gap for k in range(tokens)]
        r = RequestRecord(i, "chat", True, 10.0 + i * every, tokens, status=200, ttft=ttft, e2e=times[-1])
        r.chunk_times, r.prompt_tokens, r.completion_tokens = times, 20, tokens
        out.append(r)
    return out


def result(name: str, level: Level, recs: list[RequestRecord], gap_check: bool = True) -> LevelResult:
    summary = summarize(recs, WINDOW, SLO(ttft=1.0), open_loop=level.rate is not None)
    problems = impossible(summary, recs, ceiling=None) if gap_check else []
    loadgen = LoadGen(exit_code=0, wall_s=25.0, cpu_s=1.0, cpu_fraction=0.04)
    return LevelResult(name, level, summary, problems, [], recs, WINDOW, loadgen)


def meta() -> Meta:
    tenants = resolve_tenants(EXAMPLE, LoadConfig(warmup=120), None, environ={"NOISY_KEY": "sk-n", "QUIET_KEY": "sk-q"})
    described = [t.describe() for t in tenants]
    return Meta(
        title="2 tenants", command="llmserve bench run --tenants x", config=LoadConfig(), model="m", tenants=described
    )


@pytest.fixture
def results() -> list[LevelResult]:
    # noisy: 40 requests of 10 tokens in 20 s (20 output tok/s); quiet: 20 of 5 tokens (5 output tok/s).
    return [
        result("noisy", Level(users=192), records(40, 0.5, 10, ttft=0.4)),
        result("quiet", Level(rate=0.5), records(20, 1.0, 5, ttft=0.05)),
    ]


def test_one_row_per_tenant_and_the_sum_of_all(tmp_path: Path, results: list[LevelResult]) -> None:
    folder = report.write(tmp_path / "out", meta(), results)
    text = (folder / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["noisy"].startswith("| noisy | 192 users | 20.0 | 60.0 |"), rows["noisy"]
    assert rows["quiet"].startswith("| quiet | 0.5 req/s poisson | 5.0 | 25.0 |"), rows["quiet"]
    assert "| 400 / 400 (n=40) |" in rows["noisy"] and "| 50 / 50 (n=20) |" in rows["quiet"]
    assert rows["**all tenants**"].startswith("| **all tenants** | | 25.0 | 85.0 | 3.00 |")
    # One table of tenants: the per-level sweep table (with its quality column) is not there.
    assert "| target |" not in text and "every number covers the same 20 s window" in text
    assert "- noisy (a standard key running more streams than the engine's batch holds): 192 users" in text
    assert "key from environment variable NOISY_KEY; output_len 256, output_spread 0.5, ramp 110.0" in text
    assert "sk-n" not in text and "sk-q" not in text


def test_summary_holds_every_tenant_and_their_total(tmp_path: Path, results: list[LevelResult]) -> None:
    folder = report.write(tmp_path / "out", meta(), results)
    summary = json.loads((folder / "summary.json").read_text())
    assert [r["target"] for r in summary["results"]] == ["noisy", "quiet"]
    assert [t["name"] for t in summary["tenants"]] == ["noisy", "quiet"]
    assert summary["tenants"][1]["rate"] == 0.5 and summary["tenants"][0]["users"] == 192
    total = summary["tenants_total"]
    assert total["output_tok_s"] == pytest.approx(25.0) and total["window_s"] == 20.0
    assert total["output_share"] == {"noisy": pytest.approx(0.8), "quiet": pytest.approx(0.2)}
    rows = list(csv.DictReader((folder / "requests.csv").open()))
    assert {r["target"] for r in rows} == {"noisy", "quiet"} and len(rows) == 60
    for name in report.FILES:
        assert (folder / name).stat().st_size > 0, name
    for png in ("throughput.png", "latency.png", "latency_cdf.png"):
        assert (folder / png).read_bytes().startswith(b"\x89PNG")


def test_a_refused_tenant_leaves_no_total(tmp_path: Path, results: list[LevelResult]) -> None:
    # Every event of the quiet tenant's streams in one bunch: the stream was buffered, its numbers are refused.
    bunched = result("quiet", Level(rate=0.5), records(20, 1.0, 5, ttft=0.05, gap=0.0))
    folder = report.write(tmp_path / "out", meta(), [results[0], bunched])
    text = (folder / "report.md").read_text()
    assert "| quiet | 0.5 req/s poisson | refused: see below |" in text and "**all tenants**" not in text
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["tenants_total"] is None and summary["refused"] == 1


def test_failed_requests_are_listed_by_tenant(tmp_path: Path, results: list[LevelResult]) -> None:
    recs = records(20, 1.0, 5, ttft=0.05)
    for r in recs[:3]:
        r.status, r.error, r.completion_tokens = 429, 'HTTP 429: {"error": {"code": "queue_timeout"}}', None
    folder = report.write(tmp_path / "out", meta(), [results[0], result("quiet", Level(rate=0.5), recs)])
    text = (folder / "report.md").read_text()
    assert '- quiet: 3 x HTTP 429: {"error": {"code": "queue_timeout"}}' in text
    assert "| 17 / 3 |" in text


def test_the_throughput_over_time_adds_up_to_the_window_s() -> None:
    recs = records(40, 0.5, 10, ttft=0.4)
    edges = bins([result("noisy", Level(users=4), recs)])
    # 20 s from the first request to the last token: as many bins of at least MIN_BIN_S as fit, end to end.
    assert len(edges) == 3 and edges[0][0] == 10.0 and edges[-1][1] == pytest.approx(recs[-1].end)
    assert all(b - a >= MIN_BIN_S for a, b in edges) and all(
        x[1] == y[0] for x, y in zip(edges, edges[1:], strict=False)
    )
    rates = output_rates(recs, edges)
    produced = sum(rate * (b - a) for rate, (a, b) in zip(rates, edges, strict=True))
    assert produced == pytest.approx(400.0)
