"""A child process we own: started in its own process group, health-checked, stopped with TERM then KILL."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PROC = Path("/proc")


def die_with_parent() -> None:
    """Ask the kernel to send SIGTERM to this process when its parent dies (Linux only; no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def parent_ids(proc: Path = PROC) -> dict[int, int]:
    """Each running process's parent, from /proc (empty without it); processes that end meanwhile are left out."""
    parents: dict[int, int] = {}
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The fields after the command name, which may hold spaces and parentheses: state, then ppid.
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    return parents


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class ProcessStartError(Exception):
    """A child did not become healthy; the message holds the last lines of its log."""


class ChildProcess:
    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path | None, cpus: set[int] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        # The CPUs it runs on (all its threads, set before it starts); None: wherever the kernel puts it.
        self.cpus = cpus
        self.proc: asyncio.subprocess.Process | None = None

    def _in_child(self) -> None:
        die_with_parent()
        if self.cpus is not None:
            os.sched_setaffinity(0, self.cpus)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out: int | None = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        else:
            out = None
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env={**os.environ, **self.env},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT if out is not None else None,
                # Own process group: a terminal's Ctrl-C reaches only us, and we stop children in order.
                start_new_session=True,
                preexec_fn=self._in_child,
            )
        finally:
            if out is not None:
                os.close(out)
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open("r", encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))

    async def wait_healthy(self, url: str, within: float, interval: float = 1.0) -> None:
        """Poll `url` until it answers 200; fail early if the process exits."""
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            while True:
                if not self.running:
                    code = self.proc.returncode if self.proc else None
                    raise ProcessStartError(
                        f"{self.name} exited with code {code} before it was healthy. Last log lines:\n{self.tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise ProcessStartError(
                        f"{self.name} was not healthy after {within:.0f}s. Last log lines:\n{self.tail()}"
                    )
                await asyncio.sleep(interval)

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, grace: float) -> None:
        """SIGTERM the whole process group, wait `grace` seconds, then SIGKILL what is left."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=grace)
            except TimeoutError:
                log.warning("%s did not stop within %.0fs: killing it", self.name, grace)
        # Children of the leader (vLLM's engine core and workers) may outlive it: kill the group regardless.
        self._signal_group(signal.SIGKILL)
        await self.proc.wait()
        log.info("stopped %s", self.name)

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()


async def restart_with_backoff(
    child: ChildProcess, health_url: str, within: float, should_stop: Callable[[], bool]
) -> None:
    """Restart a dead child until it is healthy again, doubling the pause between tries (max 60 s)."""
    pause = 1.0
    while not should_stop():
        await asyncio.sleep(pause)
        if should_stop():
            return
        await child.stop(grace=1.0)
        await child.start()
        try:
            await child.wait_healthy(health_url, within)
            log.info("%s is healthy again", child.name)
            return
        except ProcessStartError as exc:
            log.error("restart of %s failed: %s", child.name, exc)
            pause = min(pause * 2, 60.0)
