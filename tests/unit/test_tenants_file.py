"""Tenants files: validation that names the file and the field, keys from a file or the environment only, the
run's options where a tenant sets none, and one window shared by every tenant."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest

from loadtests.accounting import RequestRecord
from loadtests.config import LoadConfig, options
from loadtests.progress import GroupProgress, LiveProgress
from loadtests.runner import Launched, Level, Setup, Target, locust_command, locust_run
from loadtests.tenant_run import check, shared_window
from loadtests.tenants import resolve_tenants, tenant_options
from serve.cli import parser
from serve.config.loader import ConfigError

DATA = Path(__file__).resolve().parents[2] / "loadtests" / "data"
EXAMPLE = DATA / "tenants-noisy-quiet.yaml"
FAIR = DATA / "tenants-fair-share.yaml"
ENV = {"NOISY_KEY": "sk-noisy", "QUIET_KEY": "sk-quiet", "HEAVY_KEY": "sk-h", "LIGHT_KEY": "sk-l"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    return path


def error_of(path: Path, **kw: object) -> str:
    with pytest.raises(ConfigError) as caught:
        resolve_tenants(path, LoadConfig(), None, environ=kw.pop("environ", ENV), **kw)  # type: ignore[arg-type]
    return str(caught.value)


def test_the_example_is_a_noisy_neighbour_beside_a_quiet_interactive_user() -> None:
    noisy, quiet = resolve_tenants(EXAMPLE, LoadConfig(warmup=120), None, environ=ENV)
    assert (noisy.name, noisy.level, noisy.config.output_len, noisy.key) == ("noisy", Level(users=192), 256, "sk-noisy")
    assert noisy.config.users == (192,) and noisy.config.rates is None
    assert (quiet.name, quiet.level, quiet.config.arrival, quiet.key) == (
        "quiet",
        Level(rate=0.5),
        "poisson",
        "sk-quiet",
    )
    assert quiet.config.scenario == "chat" and quiet.config.rates == (0.5,)
    assert check([noisy, quiet], LoadConfig(warmup=120)) == []
    heavy, light = resolve_tenants(FAIR, LoadConfig(warmup=80), None, environ=ENV)
    assert heavy.level.users != light.level.users and heavy.config.output_len == light.config.output_len


def test_the_key_never_reaches_what_the_report_says() -> None:
    tenants = resolve_tenants(EXAMPLE, LoadConfig(), None, environ=ENV)
    text = json.dumps([t.describe() for t in tenants])
    assert "sk-noisy" not in text and "sk-quiet" not in text
    assert tenants[0].describe()["key"] == "environment variable NOISY_KEY"


def test_a_plain_key_in_the_file_is_refused_with_what_to_do_instead(tmp_path: Path) -> None:
    path = write(tmp_path, "tenants:\n  - {name: a, users: 2, key: sk-llms-plain}\n")
    message = error_of(path)
    assert str(path) in message and "tenants[0] (a)" in message
    assert "a plain key never goes in a tenants file" in message and "key_env" in message
    assert "sk-llms-plain" not in message


@pytest.mark.parametrize(
    ("entry", "where", "says"),
    [
        ("{name: a, users: 2, rate: 1}", "tenants[0] (a)", "exactly one load shape"),
        ("{name: a}", "tenants[0] (a)", "exactly one load shape"),
        ("{name: a, users: 0}", "tenants[0] (a).users", "greater than 0"),
        ("{name: a, rate: 1, scenario: nope}", "tenants[0] (a).scenario", "'chat'"),
        ("{name: a, rate: 1, ramp: 5}", "tenants[0] (a)", "ramp is for closed-loop users"),
        ("{name: a, users: 2, arrival: constant}", "tenants[0] (a)", "for an open-loop tenant"),
        ("{name: a, users: 2, warmup: 5}", "tenants[0] (a).warmup", "Extra inputs"),
        ("{name: a, users: 2, output_len: many}", "tenants[0] (a).output_len", "valid integer"),
        ("{name: a, users: 2, output_len: 9, output_spread: 1}", "tenants[0] (a).output_spread", "less than 1"),
        ("{name: a, users: 2, ignore_eos: null}", "tenants[0] (a).ignore_eos", "valid boolean"),
        ("{name: a/b, users: 2}", "tenants[0] (a/b).name", "pattern"),
        ("{name: a, users: 2, key_env: A, key_file: k}", "tenants[0] (a)", "at most one of key_file and key_env"),
    ],
)
def test_errors_name_the_file_the_tenant_and_the_field(tmp_path: Path, entry: str, where: str, says: str) -> None:
    message = error_of(write(tmp_path, f"tenants:\n  - {entry}\n"))
    assert message.startswith(f"{tmp_path / 'tenants.yaml'}: invalid tenants file"), message
    line = next((x for x in message.splitlines() if x.strip().startswith(where + ":")), None)
    assert line is not None and says in line, message


def test_tenant_names_must_differ_and_the_file_must_list_some(tmp_path: Path) -> None:
    twice = error_of(write(tmp_path, "tenants:\n  - {name: a, users: 1}\n  - {name: a, rate: 1}\n"))
    assert "tenants: tenant names must differ: a more than once" in twice
    assert "at least 1 item" in error_of(write(tmp_path, "tenants: []\n"))
    assert "expected a mapping" in error_of(write(tmp_path, "- name: a\n"))


def test_keys_come_from_the_environment_or_a_file_beside_the_tenants_file(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "b.key").write_text("sk-from-file\n")
    path = write(
        tmp_path, "tenants:\n  - {name: a, users: 1, key_env: A_KEY}\n  - {name: b, rate: 1, key_file: keys/b.key}\n"
    )
    a, b = resolve_tenants(path, LoadConfig(), "sk-run", environ={"A_KEY": "sk-from-env"})
    assert (a.key, b.key) == ("sk-from-env", "sk-from-file")
    assert b.key_source == f"key file {tmp_path / 'keys' / 'b.key'}"
    unset = error_of(path, environ={})
    assert unset == f"{path}: tenants[0] (a).key_env: the environment variable A_KEY is not set"
    (tmp_path / "keys" / "b.key").write_text("\n")
    assert "tenants[1] (b).key_file:" in error_of(path, environ={"A_KEY": "x"})
    (tmp_path / "keys" / "b.key").unlink()
    assert "cannot read" in error_of(path, environ={"A_KEY": "x"})
    # Without a key of its own a tenant uses the run's --key.
    alone = write(tmp_path, "tenants:\n  - {name: c, users: 1}\n")
    (c,) = resolve_tenants(alone, LoadConfig(), "sk-run", environ={})
    assert (c.key, c.key_source) == ("sk-run", "the run's --key")


def test_what_a_tenant_does_not_set_is_the_run_s(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "tenants:\n  - {name: a, users: 3, output_len: 9, max_p99_ttft: 1.5, temperature: 0}\n  - {name: b, rate: 2}\n",
    )
    run = LoadConfig(scenario="completion", output_len=64, warmup=7, duration=30, slo_ttft=0.5)
    a, b = resolve_tenants(path, run, None, environ={})
    assert (a.config.output_len, a.config.max_p99_ttft, a.config.temperature) == (9, 1.5, 0.0)
    assert (b.config.output_len, b.config.max_p99_ttft, b.config.temperature) == (64, None, None)
    for t in (a, b):
        assert (t.config.scenario, t.config.warmup, t.config.duration, t.config.slo_ttft) == ("completion", 7, 30, 0.5)
    assert a.overrides == ("output_len", "temperature", "max_p99_ttft") and b.overrides == ()
    assert "output length 9" in a.settings() and "max_p99_ttft 1.5" in a.settings()
    assert Setup(a.config).thresholds.max_p99_ttft == 1.5


def test_a_run_may_pick_some_tenants_of_the_file() -> None:
    (quiet,) = resolve_tenants(EXAMPLE, LoadConfig(), None, only=["quiet"], environ={"QUIET_KEY": "q"})
    assert quiet.name == "quiet"
    assert "no tenant named loud (the file has noisy, quiet)" in error_of(EXAMPLE, only=["loud"])


def test_tenant_options_are_the_ones_config_marks() -> None:
    marked = {f.name for f, o in options(LoadConfig) if o.tenant}
    assert set(tenant_options().model_fields) == marked
    # A tenants run has one window for everyone: the run's timing and levels are no tenant's to change.
    assert not marked & {"warmup", "duration", "stop_timeout", "users", "rates", "num_requests"}


def test_run_wide_load_options_and_a_ramp_past_the_warm_up_are_refused() -> None:
    tenants = resolve_tenants(EXAMPLE, LoadConfig(), None, environ=ENV)
    problems = check(tenants, LoadConfig(users=(4,), num_requests=10))
    assert any(p.startswith("--users:") for p in problems) and any(p.startswith("--num-requests:") for p in problems)
    assert any("tenant noisy: its users join over 110 s, longer than the 10 s warm-up" in p for p in problems)
    args = parser().parse_args(["bench", "run", "--tenants", str(EXAMPLE), "--tenant", "quiet", "--ramp", "5"])
    assert args.tenants == str(EXAMPLE) and args.tenant == ["quiet"] and args.ramp == 5.0


def test_users_join_over_the_ramp() -> None:
    target = Target("t", "http://127.0.0.1:1", None, "m")
    for config, rate in (
        (LoadConfig(warmup=10), "40"),
        (LoadConfig(warmup=120, ramp=100), "2"),
        (LoadConfig(warmup=0), "200"),
    ):
        setup = Setup(config)
        cmd = locust_command(
            target, Level(users=200), config, locust_run(target, Level(users=200), setup, Path("r"), "s")
        )
        assert cmd[cmd.index("-r") + 1] == rate, config


def record(i: int, start: float) -> dict[str, object]:
    r = RequestRecord(i, "chat", True, start, 4, status=200, ttft=0.1, e2e=0.4, chunk_times=[0.1, 0.2, 0.3, 0.4])
    r.prompt_tokens, r.completion_tokens = 10, 4
    return {"type": "request", **json.loads(r.to_json())}


def launched(tmp_path: Path, name: str, started: float, stopping: float, warmup: float) -> Launched:
    path = tmp_path / f"{name}.jsonl"
    lines = [{"type": "start", "t": started}, record(0, started + 1), {"type": "stopping", "t": stopping}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = subprocess.Popen(["true"])
    proc.wait()
    target = Target(name, "http://127.0.0.1:1", None, "m")
    return Launched(target, Level(users=1), Setup(LoadConfig(warmup=warmup)), proc, path, path, 0.0, None)


def test_every_tenant_is_measured_over_the_same_seconds(tmp_path: Path) -> None:
    # Started a second apart, stopped a second apart: only where both ran after their warm-ups counts.
    a = launched(tmp_path, "a", 1000.0, 1070.0, 10)
    b = launched(tmp_path, "b", 1001.0, 1071.5, 10)
    window = shared_window([a, b])
    assert (window.t0, window.t1) == (1011.0, 1070.0)
    # Windows that do not overlap leave an empty one, never a negative one.
    c = launched(tmp_path, "c", 2000.0, 2010.0, 1)
    empty = shared_window([a, c])
    assert empty.seconds == 0.0


def test_the_progress_of_several_tenants_is_one_line_each(tmp_path: Path) -> None:
    out = io.StringIO()
    parts = []
    for name in ("noisy", "quiet"):
        path = tmp_path / f"{name}.jsonl"
        markers = [{"type": "start", "t": 100.0}, {"type": "progress", "t": 105.0, "sent": 3, "done": 2}]
        path.write_text("".join(json.dumps(m) + "\n" for m in markers))
        parts.append(LiveProgress(name, path, LoadConfig(warmup=10), out))
    GroupProgress(parts, out).update(now=106.0)
    lines = out.getvalue().splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["noisy", "quiet"]
    assert all("warm-up 6/10 s, 2 requests done" in line for line in lines)
