"""The processes of `llmserve bench sweep`: one engine at a time in its own process group, and the bench commands."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LLMSERVE = [sys.executable, "-m", "serve.cli"]
# vLLM reads its API key from this variable; the bench commands read theirs from LLMSERVE_API_KEY (`--key`).
ENGINE_KEY = "VLLM_API_KEY"
BENCH_KEY = "LLMSERVE_API_KEY"
HEALTH_POLL_S = 1.0


class SweepError(Exception):
    """An engine did not come up; the message holds the last lines of its log."""


def engine_argv(model_file: Path, port: int) -> list[str]:
    return [*LLMSERVE, "engine", str(model_file), "--port", str(port)]


def signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop(proc: subprocess.Popen[Any], grace: float) -> None:
    """TERM the process group, KILL what is left after `grace` (vLLM's engine core may outlive the server).

    A second Ctrl-C while waiting skips the rest of the grace, never the KILL."""
    try:
        if proc.poll() is None:
            signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
    finally:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_healthy(proc: subprocess.Popen[Any], url: str, within: float, log: Path) -> float:
    """Seconds until `url`/health answered 200; fails early when the engine exits."""
    import httpx

    t0 = time.monotonic()
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                raise SweepError(f"the engine exited with code {proc.returncode}; the end of {log}:\n{tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health").status_code == 200:
                    return time.monotonic() - t0
            if time.monotonic() - t0 > within:
                raise SweepError(f"the engine was not healthy after {within:g} s; the end of {log}:\n{tail(log)}")
            time.sleep(HEALTH_POLL_S)


@contextlib.contextmanager
def group(argv: list[str], env: dict[str, str], log: Path, grace: float) -> Iterator[subprocess.Popen[Any]]:
    """`argv` in a process group of its own, output appended to `log`, stopped whatever happens in the block."""
    from serve.engine.process import die_with_parent

    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own group: a terminal's Ctrl-C reaches only the sweep, which then stops every process of it.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    try:
        yield proc
    finally:
        stop(proc, grace)


def run_logged(argv: list[str], log: Path, env: dict[str, str]) -> int:
    """Run a bench command with its output in `log`; its exit code (1 and 3 still leave a result folder)."""
    from serve.engine.process import die_with_parent

    with log.open("ab") as out:
        done = subprocess.run(
            argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
    return done.returncode
