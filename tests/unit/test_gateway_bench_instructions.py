"""The instruction-count mode of `llmserve bench gateway`: reading callgrind's dumps and the table it prints."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from loadtests.gateway_bench_instructions import dumped, instructions_table


def test_the_newest_dump_since_the_listing_is_read(tmp_path: Path) -> None:
    prefix = tmp_path / "callgrind-main.out"
    old = tmp_path / "callgrind-main.out.1"
    old.write_text("events: Ir\nsummary: 111\n")
    before = set(tmp_path.glob(prefix.name + "*"))
    first = tmp_path / "callgrind-main.out.2"
    first.write_text("version: 1\ncmd: python\nevents: Ir\nsummary: 5000\n\nfn=(1) x\n0 5000\ntotals: 5000\n")
    newest = tmp_path / "callgrind-main.out.3"
    newest.write_text("events: Ir\ntotals: 7000\n")
    os.utime(first, (time.time() - 10, time.time() - 10))
    assert dumped(prefix, before) == 7000


def test_a_dump_that_never_comes_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 1000, 30))
    monkeypatch.setattr("loadtests.gateway_bench_instructions.time.monotonic", lambda: float(next(clock)))
    monkeypatch.setattr("loadtests.gateway_bench_instructions.time.sleep", lambda _: None)
    with pytest.raises(RuntimeError, match="no dump"):
        dumped(tmp_path / "callgrind-x.out", set())


def test_the_table_compares_every_gateway_with_the_first() -> None:
    results = {
        "before": {"plain": {"per_request": 600_000}, "stream": {"per_request": 1_200_000}},
        "after": {"plain": {"per_request": 450_000}, "stream": {"per_request": 1_200_000}},
    }
    lines = instructions_table(results).splitlines()
    assert lines[1].split() == ["before", "plain", "600,000", "1.000x"]
    assert lines[2].split() == ["after", "plain", "450,000", "0.750x"]
    assert lines[4].split() == ["after", "stream", "1,200,000", "1.000x"]
