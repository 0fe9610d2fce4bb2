"""How `up` starts a Ray Serve model: the runner's command line, its Ray environment, ports, and refusals."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from serve.cli import main
from serve.config.model_file import ModelFile, load_model_file
from serve.engine.process import ProcessStartError
from serve.ray import launch
from serve.ray.cluster import RayClusterError, cluster_resources
from serve.ray.launch import ray_serve_child

ROOT = Path(__file__).resolve().parents[2]
RAY_FILE = ROOT / "configs/models/smollm2-135m-cpu-ray.yaml"


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def with_ray(**ray: Any) -> ModelFile:
    return ModelFile.model_validate(
        {
            "name": "org/m",
            "source": "a/b",
            "engine": {"device": "cpu", "max_model_len": 512, "shutdown_timeout": 7},
            "policy": {"max_tokens_cap": 10},
            "ray": {"serve": {}, **ray},
        }
    )


def test_a_local_cluster_is_on_loopback_with_a_fresh_token_and_normal_priority(tmp_path: Path) -> None:
    first = ray_serve_child(load_model_file(RAY_FILE), RAY_FILE, "/w", tmp_path, set())
    second = ray_serve_child(load_model_file(RAY_FILE), RAY_FILE, "/w", tmp_path, set())
    env = first.child.env
    assert env["RAY_AUTH_MODE"] == "token"
    assert len(env["RAY_AUTH_TOKEN"]) == 64 and env["RAY_AUTH_TOKEN"] != second.child.env["RAY_AUTH_TOKEN"]
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["RAY_worker_niceness"] == "0"
    argv = first.child.argv
    assert argv[1:3] == ["-m", "serve.ray.runner"]
    assert "--address" not in argv and flag(argv, "--num-cpus") == "4"
    assert flag(argv, "--model-file") == str(RAY_FILE.resolve())
    assert first.url == f"http://127.0.0.1:{flag(argv, '--port')}"
    assert first.ready_file == tmp_path / "run" / "ray-serve-smollm2-135m-instruct-ray.ready"


def test_a_given_cluster_keeps_its_own_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = ray_serve_child(with_ray(address="head:6379"), RAY_FILE, "/w", tmp_path, set())
    assert flag(run.child.argv, "--address") == "head:6379"
    assert run.child.env == {}
    monkeypatch.setenv("RAY_ADDRESS", "other:6379")
    run = ray_serve_child(with_ray(), RAY_FILE, "/w", tmp_path, set())
    assert flag(run.child.argv, "--address") == "other:6379"


def test_the_stop_timeout_covers_the_engine_and_ray(tmp_path: Path) -> None:
    run = ray_serve_child(with_ray(), RAY_FILE, "/w", tmp_path, set())
    assert flag(run.child.argv, "--stop-timeout") == str(7 + launch.RAY_STOP_SECONDS)
    assert run.ready_file.name == "ray-serve-org_m.ready"


def test_the_serve_port_is_never_the_gateways(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ports = iter([8000, 8000, 41234])
    monkeypatch.setattr(launch, "free_port", lambda: next(ports))
    run = ray_serve_child(with_ray(), RAY_FILE, "/w", tmp_path, {8000})
    assert run.url == "http://127.0.0.1:41234"
    assert ray_serve_child(with_ray(serve={"port": 9100}), RAY_FILE, "/w", tmp_path, {8000}).url.endswith(":9100")
    with pytest.raises(ProcessStartError, match="ray.serve.port 8000 is already taken"):
        ray_serve_child(with_ray(serve={"port": 8000}), RAY_FILE, "/w", tmp_path, {8000})


def test_without_ray_installed_the_message_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    with pytest.raises(ProcessStartError, match=r"runs on Ray Serve, but Ray is not installed here: pip install"):
        ray_serve_child(with_ray(), RAY_FILE, "/w", tmp_path, set())
    with pytest.raises(RayClusterError, match=r"Ray is not installed here"):
        cluster_resources("head:6379")


def test_llmserve_engine_refuses_a_ray_serve_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["engine", str(RAY_FILE), "--print"]) == 2
    assert "runs on Ray Serve" in capsys.readouterr().err


REAP_SCRIPT = """
import subprocess, sys, time
from serve.ray.runner import children, reap_leftovers
stubborn = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(15, signal.SIG_IGN); time.sleep(60)"]
)
time.sleep(0.5)
assert stubborn.pid in children(), "the stubborn child is not seen"
started = time.monotonic()
reap_leftovers(grace=1.0)
assert stubborn.pid not in children(), "the stubborn child survived"
print(f"reaped in {time.monotonic() - started:.1f}s")
"""


def test_leftover_children_are_stopped_and_reaped() -> None:
    # In a process of its own: reap_leftovers stops every child of the calling process, and this test process
    # has children of its own (the session's stack) that must live on.
    done = subprocess.run([sys.executable, "-c", REAP_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seconds = float(done.stdout.split()[2].rstrip("s"))
    assert seconds < 10
