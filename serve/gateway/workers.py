"""Several gateway processes on one port: a supervisor that starts, restarts and drains worker processes.

The supervisor binds the listening socket and hands it to each worker (spawned: no state is shared); the kernel
spreads new connections over the workers accepting on it. Workers take no stop signal of their own: the supervisor
tells them over a pipe, so one SIGTERM to the whole process group (as `llmserve up` sends) drains once, and a second
one exits at once. A worker whose supervisor is gone drains and exits.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn

from serve.config.gateway import GatewaySettings
from serve.gateway.server import STARTUP_FAILURE, GatewayServer, gateway_server
from serve.logs import setup_logging

log = logging.getLogger(__name__)

SPAWN = multiprocessing.get_context("spawn")
# A worker that died is started again no sooner than this after its previous start: a crash loop must not spin.
RESTART_INTERVAL = 1.0
DRAIN, EXIT_NOW = b"drain", b"exit"


def worker_main(settings: GatewaySettings, sock: socket.socket, control: Connection) -> None:
    """A worker process: one gateway on the shared socket, stopped by its supervisor's word."""
    # Ctrl-C and `kill -TERM -<group>` reach every worker too; only the supervisor's word counts.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    # The app takes SIGHUP (keys reload) once its lifespan runs; until then SIGHUP must not kill the worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setup_logging(settings.file.log_level, access_log=True)
    server = gateway_server(settings, own_signals=False)
    threading.Thread(target=listen, args=(control, server), daemon=True).start()
    server.run(sockets=[sock])
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


def listen(control: Connection, server: GatewayServer) -> None:
    """The supervisor's words: the first drains, a second exits now; losing the supervisor drains."""
    while True:
        try:
            word = control.recv_bytes()
        except (EOFError, OSError):
            if not server.drain.active:
                server.drain.begin()
            return
        if word == EXIT_NOW:
            server.should_exit = True
        elif not server.drain.active:
            server.drain.begin()


@dataclass
class Worker:
    slot: int
    process: BaseProcess
    control: Connection
    started_at: float = field(default_factory=time.monotonic)


class Supervisor:
    """Keeps `workers` processes serving until a stop signal; then drains them and returns their verdict."""

    def __init__(self, settings: GatewaySettings, sock: socket.socket) -> None:
        self.settings = settings
        self.sock = sock
        self.workers: dict[int, Worker] = {}
        # Workers that died, by slot, and when they may start again.
        self.restarts: dict[int, float] = {}
        # Set by signal handlers, acted on by the loop.
        self.stops = 0
        self.hups = 0
        self.exit_code = 0

    def on_signal(self, sig: int, _: FrameType | None) -> None:
        if sig == signal.SIGHUP:
            self.hups += 1
        else:
            self.stops += 1

    def run(self) -> int:
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self.on_signal) for sig in handled}
        try:
            for slot in range(self.settings.file.workers):
                self.start(slot)
            self.supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    def start(self, slot: int) -> None:
        parent, child = SPAWN.Pipe()
        process = SPAWN.Process(
            target=worker_main, args=(self.settings, self.sock, child), name=f"llmserve-gateway-{slot}"
        )
        process.start()
        child.close()
        self.workers[slot] = Worker(slot=slot, process=process, control=parent)
        log.info("gateway worker %d started (pid %s)", slot, process.pid)

    def supervise(self) -> None:
        told = hups = 0
        while self.workers or self.restarts:
            if self.stops > told:
                told = self.stops
                if told == 1:
                    log.info("draining %d gateway workers", len(self.workers))
                self.tell(DRAIN if told == 1 else EXIT_NOW)
                self.restarts.clear()
            if self.hups > hups:
                hups = self.hups
                self.signal_all(signal.SIGHUP)
            for slot, due in list(self.restarts.items()):
                if time.monotonic() >= due:
                    del self.restarts[slot]
                    self.start(slot)
            by_sentinel = {w.process.sentinel: w for w in self.workers.values()}
            for sentinel in wait(list(by_sentinel), timeout=0.2):
                assert isinstance(sentinel, int)
                self.reap(by_sentinel[sentinel], stopping=told > 0)

    def tell(self, word: bytes) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(OSError):
                worker.control.send_bytes(word)

    def signal_all(self, sig: signal.Signals) -> None:
        for worker in self.workers.values():
            if worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, sig)

    def reap(self, worker: Worker, stopping: bool) -> None:
        worker.process.join()
        worker.control.close()
        del self.workers[worker.slot]
        code = worker.process.exitcode
        if stopping:
            log.info("gateway worker %d exited with code %s", worker.slot, code)
            if code != 0 and self.exit_code == 0:
                self.exit_code = 1
        elif code == STARTUP_FAILURE:
            # It could not start (a model file, the keys file, Redis): the others would fail the same way.
            log.error("gateway worker %d failed to start: stopping every worker", worker.slot)
            self.exit_code = STARTUP_FAILURE
            self.stops = max(self.stops, 1)
        else:
            log.error("gateway worker %d died (exit code %s): starting it again", worker.slot, code)
            self.restarts[worker.slot] = max(time.monotonic(), worker.started_at + RESTART_INTERVAL)


def run_workers(settings: GatewaySettings) -> int:
    if settings.file.limits.backend == "memory":
        log.warning(
            "%d gateway workers with limits.backend memory: each worker counts per-key limits on its own, so a key "
            "may get up to %d times its limits; limits.backend redis shares them",
            settings.file.workers,
            settings.file.workers,
        )
    # uvicorn's own binding: the address family from the host, SO_REUSEADDR, its "running on" line.
    sock = uvicorn.Config(app="", host=settings.file.host, port=settings.file.port).bind_socket()
    try:
        return Supervisor(settings, sock).run()
    finally:
        sock.close()
