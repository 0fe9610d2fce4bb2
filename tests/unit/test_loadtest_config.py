"""Load-test options declared once: flags, the Locust process's options and the report come from one dataclass."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from loadtests import config
from loadtests.config import LoadConfig, LocustRun, QualityConfig, from_args, locust_argv, locust_env
from loadtests.runner import Level, Setup, Target, locust_command, locust_run
from loadtests.scenarios import Lengths
from serve.cli import parser

RECORDS = Path("/nonexistent/records.jsonl")


class RecordingParser:
    """Takes Locust's add_argument keywords and builds a plain argparse parser from them."""

    def __init__(self) -> None:
        self.parser = argparse.ArgumentParser()
        self.env: dict[str, str] = {}
        self.secret: set[str] = set()
        self.hidden: set[str] = set()

    def add_argument(self, name: str, **kw: Any) -> None:
        self.env[kw["dest"]] = kw.pop("env_var")
        if kw.pop("is_secret"):
            self.secret.add(kw["dest"])
        if not kw.pop("include_in_web_ui"):
            self.hidden.add(kw["dest"])
        self.parser.add_argument(name, **kw)


def locust_parser() -> RecordingParser:
    recording = RecordingParser()
    config.add_locust_options(recording, (LoadConfig, LocustRun))
    return recording


def test_every_option_has_help_and_one_default() -> None:
    for cls in (LoadConfig, QualityConfig, LocustRun):
        for f, o in config.options(cls):
            assert o.help, f.name
            assert f.default is not dataclasses.MISSING, f.name
    # The flags take their defaults from the fields: no second copy on the command line.
    args = parser().parse_args(["bench", "run"])
    assert from_args(LoadConfig, args) == LoadConfig()
    assert from_args(QualityConfig, args) == QualityConfig()
    assert parser().parse_args(["bench", "run"]).stop_timeout == LoadConfig().stop_timeout


def test_compare_has_its_own_levels_duration_and_rounds() -> None:
    compare = from_args(LoadConfig, parser().parse_args(["bench", "compare"]))
    assert compare == dataclasses.replace(LoadConfig(), users=(1, 8, 32, 64), duration=40.0, rounds=2)


def test_flags_parse_into_the_config() -> None:
    argv = ["bench", "run", "--no-ignore-eos", "--no-cache-salt", "--users", "2,4", "--num-requests", "50"]
    argv += ["--temperature", "0", "--scenario", "mix", "--slo-e2e", "9", "--no-quality"]
    args = parser().parse_args(argv)
    c = from_args(LoadConfig, args)
    assert (c.ignore_eos, c.cache_salt, c.users, c.num_requests, c.temperature) == (False, False, (2, 4), 50, 0.0)
    assert (c.scenario, c.slo_e2e) == ("mix", 9.0)
    assert from_args(QualityConfig, args).quality is False
    with pytest.raises(SystemExit):
        parser().parse_args(["bench", "run", "--scenario", "nope"])
    spread = from_args(LoadConfig, parser().parse_args(["bench", "run", "--output-len", "64", "--output-spread", ".5"]))
    assert spread.lengths == Lengths(output_len=64, output_spread=0.5)
    for wrong in ("1", "-0.1", "half"):
        with pytest.raises(SystemExit):
            parser().parse_args(["bench", "run", "--output-spread", wrong])


def test_the_locust_process_gets_back_the_same_config() -> None:
    chosen = LoadConfig(
        scenario="long-prompt", seed=3, output_len=32, output_spread=0.25, ignore_eos=False, warmup=2.5, num_requests=40
    )
    run = LocustRun(model="m", api_key="s3cret", sampling='{"temperature": 0}', max_model_len=2048, rate=2.0)
    argv = locust_argv(chosen, run)
    assert "s3cret" not in argv  # the key travels in the environment
    assert locust_env(run) == {"LOADTEST_API_KEY": "s3cret"}
    recording = locust_parser()
    options = recording.parser.parse_args(argv)
    back = from_args(LoadConfig, options, locust=True)
    # The Locust process sees every option it is given; the rest (criteria, levels) keep their defaults.
    locust_fields = {f.name for f, o in config.options(LoadConfig) if o.locust}
    assert {n: getattr(back, n) for n in locust_fields} == {n: getattr(chosen, n) for n in locust_fields}
    assert from_args(LocustRun, options, locust=True) == dataclasses.replace(run, api_key="")
    assert recording.env["scenario"] == "LOADTEST_SCENARIO" and recording.secret == {"api_key"}
    assert {"records", "progress_every"} <= recording.hidden


def test_locust_web_ui_text_is_parsed_back() -> None:
    # The web UI hands back text for options whose default is None.
    ui = argparse.Namespace(num_requests="25", input_len="", rate="1.5", max_model_len="none")
    assert from_args(LoadConfig, ui, locust=True).num_requests == 25
    assert from_args(LoadConfig, ui, locust=True).input_len is None
    assert from_args(LocustRun, ui, locust=True).rate == 1.5


def test_the_locust_command_by_time_or_by_count() -> None:
    target = Target("t", "http://127.0.0.1:1", "k", "m")
    timed = Setup(LoadConfig(warmup=10, duration=30))
    run = locust_run(target, Level(users=4), timed, RECORDS, "salt")
    cmd = locust_command(target, Level(users=4), timed.config, run)
    assert cmd[cmd.index("-t") + 1] == "40s" and cmd[cmd.index("--stop-timeout") + 1] == "120"
    assert cmd[cmd.index("--salt") + 1] == "salt"
    counted = Setup(LoadConfig(num_requests=100))
    cmd = locust_command(
        target, Level(users=4), counted.config, locust_run(target, Level(users=4), counted, RECORDS, "s")
    )
    assert "-t" not in cmd and cmd[cmd.index("--num-requests") + 1] == "100"
    unsalted = Setup(LoadConfig(cache_salt=False))
    assert locust_run(target, Level(rate=2.0), unsalted, RECORDS, "s").salt == ""


def test_the_report_lists_what_was_set() -> None:
    lines = config.report_lines(LoadConfig(output_len=64, warmup=5, duration=20, ignore_eos=False))
    assert "output length 64" in lines and "warm-up 5 s" in lines and "measured per level 20 s" in lines
    assert "ignore_eos off" in lines and not any(line.startswith("input length") for line in lines)
    counted = config.report_lines(LoadConfig(num_requests=80))
    assert "requests per level 80" in counted and not any(line.startswith("measured per level") for line in counted)


def test_sampling_comes_from_flags_then_the_model_file_then_the_api_default() -> None:
    assert config.sampling(LoadConfig(), {}) == config.FALLBACK_SAMPLING
    assert config.sampling(LoadConfig(), {"temperature": 0.2, "top_k": 5}) == {"temperature": 0.2, "top_k": 5}
    assert config.sampling(LoadConfig(temperature=0.0, top_p=0.9), {"temperature": 0.2}) == {
        "temperature": 0.0,
        "top_p": 0.9,
    }
