"""The soak's faults: the engine SIGKILLed (its supervisor restarts it) and Redis killed and started again, mid-run."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tests.soak.redis_server import RedisServer

log = logging.getLogger(__name__)

# After a fault is over, the gateway may still answer a few requests from what it saw during it: its health check
# (every 2 s) marks the engine up again, and each Redis connection pooled before the restart fails once when used.
GRACE = 10.0
ENGINE_BACK_WITHIN = 900.0
REDIS_DOWN_FOR = 2.0


@dataclass
class Window:
    """A fault from its start to the moment what it broke answered again (None: it never did)."""

    kind: str
    start: float
    back: float | None = None

    def covers(self, t0: float, t1: float) -> bool:
        end = (self.back if self.back is not None else float("inf")) + GRACE
        return t0 <= end and t1 >= self.start


def engine_healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class FaultPlan:
    """When each fault happens, in seconds after the load starts. One at a time: the Redis restart waits until the
    engine is back, so that every failure belongs to one fault."""

    engine_at: float
    redis_at: float


def plan_for(duration: float, warmup: float) -> FaultPlan:
    return FaultPlan(engine_at=max(warmup + 5, 0.3 * duration), redis_at=0.65 * duration)


class Faults:
    def __init__(
        self,
        plan: FaultPlan,
        engine_url: str,
        engine_pid: Callable[[], int],
        redis: RedisServer,
        stop: threading.Event,
    ) -> None:
        self.plan = plan
        self.engine_url = engine_url
        self.engine_pid = engine_pid
        self.redis = redis
        self.stop = stop
        self.windows: list[Window] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._guarded, name="soak-faults", daemon=True)

    def start(self, load_start: float) -> None:
        self.load_start = load_start
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    @property
    def recovered_at(self) -> float | None:
        """When the last fault was over, once every fault is; None before."""
        if not self.done or not self.windows or any(w.back is None for w in self.windows):
            return None
        return max(w.back for w in self.windows if w.back is not None)

    def _at(self, offset: float) -> bool:
        """Wait until `offset` seconds after the load started; False if the soak stopped first."""
        return not self.stop.wait(max(0.0, self.load_start + offset - time.time()))

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test, which fails on it
            self.error = exc

    def _run(self) -> None:
        if not self._at(self.plan.engine_at):
            return
        pid = self.engine_pid()
        engine = Window("engine_killed", time.time())
        self.windows.append(engine)
        os.kill(pid, signal.SIGKILL)
        log.info("soak: engine %d killed", pid)
        # The old process may answer /health for a moment while it dies: wait for it to go first.
        deadline = time.monotonic() + 30
        while engine_healthy(self.engine_url) and time.monotonic() < deadline:
            time.sleep(0.2)
        deadline = time.monotonic() + ENGINE_BACK_WITHIN
        while not engine_healthy(self.engine_url):
            if time.monotonic() > deadline:
                return
            time.sleep(0.5)
        engine.back = time.time()
        if not self._at(max(self.plan.redis_at, engine.back - self.load_start + GRACE)):
            return
        window = Window("redis_restarted", time.time())
        self.windows.append(window)
        self.redis.kill()
        time.sleep(REDIS_DOWN_FOR)
        self.redis.start()
        window.back = time.time()
