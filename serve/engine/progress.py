"""Engine start progress: what a starting vLLM engine is doing, read from its own log and shown on stderr."""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from enum import StrEnum
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
# Without a phase change, a plain (non-terminal) stream gets at most one "still ..." line per this many seconds.
STILL_EVERY_SECONDS = 15.0
# vLLM's CPU backend compiles inside its warm-up and logs nothing of it: a warm-up from the compile cache took ~20 s
# here, a first one with the compile ~80 s. One that lasts longer than this is shown as the first start's compile.
FIRST_COMPILE_AFTER = 40.0
# A line longer than this (vLLM's config dump) is only ever an unknown line: its start is not kept.
MAX_LINE_CHARS = 64 * 1024


class Phase(StrEnum):
    # In the order an engine goes through them. A phase never goes back: tensor-parallel ranks log the same steps
    # a little apart, and one rank's late line must not undo what another already reached.
    STARTING = "starting"
    LOADING = "loading weights"
    WARMING = "warming up"
    COMPILING = "compiling"
    FIRST_COMPILE = "compiling (first start: cached for the next one)"
    CACHED_COMPILE = "warming up (compiled graph loaded from the cache)"
    KV_CACHE = "allocating KV cache"
    CAPTURING = "capturing CUDA graphs"
    SERVER = "starting the API server"
    READY = "ready"


ORDER = {phase: rank for rank, phase in enumerate(Phase)}

# A stable part of a log line and the phase it begins; vLLM 0.32's messages (paths under vllm/) and uvicorn's.
# vLLM logs mostly when a step ends, so a line begins the step that follows the one it reports.
SIGNS: tuple[tuple[str, Phase], ...] = (
    ("Starting to load model", Phase.LOADING),  # v1/worker/cpu_model_runner.py, v1/worker/gpu_model_runner.py
    ("Loading model from scratch", Phase.LOADING),  # v1/worker/gpu/model_runner.py (the V2 model runner)
    ("Warming up model for the compilation", Phase.WARMING),  # v1/worker/cpu_model_runner.py: compiles inside
    ("Starting torch.compile", Phase.COMPILING),  # compilation/monitor.py
    ("Dynamo bytecode transform time", Phase.COMPILING),  # compilation/backends.py: Inductor's turn next
    ("Cache the graph of compile range", Phase.FIRST_COMPILE),  # compilation/backends.py: a cache miss
    ("Compiling a graph for compile range", Phase.FIRST_COMPILE),  # compilation/backends.py
    ("Directly load the compiled graph", Phase.CACHED_COMPILE),  # compilation/backends.py: a cache hit
    ("Directly load AOT compilation", Phase.CACHED_COMPILE),  # compilation/decorators.py
    ("GiB for KV cache on node", Phase.KV_CACHE),  # v1/worker/cpu_worker.py ("Auto set"/"Explicitly set (...)")
    ("Available KV cache memory", Phase.KV_CACHE),  # v1/worker/gpu_worker.py
    (" KV cache size: ", Phase.KV_CACHE),  # v1/core/kv_cache_utils.py ("CPU KV cache size: 87,381 tokens")
    ("Capturing CUDA graphs", Phase.CAPTURING),  # v1/worker/gpu_model_runner.py (a progress bar's title)
    ("init engine (profile, create kv cache, warmup model) took", Phase.SERVER),  # v1/engine/core.py
    ("Starting vLLM server on", Phase.SERVER),  # entrypoints/launchers/api_server/entry.py
    ("Application startup complete", Phase.READY),  # uvicorn/lifespan/on.py
)


def classify(line: str) -> Phase | None:
    """The phase a log line shows the engine entering; None for every other line."""
    for sign, phase in SIGNS:
        if sign in line:
            return phase
    return None


class Screen:
    """Where progress goes: plain lines; on a terminal also one status line, rewritten in place, for every engine."""

    def __init__(self, out: TextIO, live: bool | None = None) -> None:
        self.out = out
        self.live = out.isatty() if live is None else live
        self.status: dict[str, str] = {}

    def line(self, text: str) -> None:
        self._clear()
        self.out.write(text + "\n")
        self._draw()

    def show(self, key: str, text: str | None) -> None:
        """Set (or with None, remove) one engine's part of the status line; nothing on a plain stream."""
        if not self.live:
            return
        self._clear()
        if text is None:
            self.status.pop(key, None)
        else:
            self.status[key] = text
        self._draw()

    def _clear(self) -> None:
        if self.live and self.status:
            self.out.write("\r\x1b[K")

    def _draw(self) -> None:
        if self.live and self.status:
            # One character short of the width: a wrapped line could no longer be rewritten with \r.
            self.out.write("; ".join(self.status.values())[: shutil.get_terminal_size().columns - 1])
        self.out.flush()


class StartProgress:
    """One engine's start as its log tells it: each poll reads the bytes added since the last, says a new phase
    once, and otherwise how long it has been."""

    def __init__(
        self,
        label: str,
        log_path: Path | None,
        screen: Screen,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.log_path = log_path
        self.screen = screen
        self.clock = clock
        self.started = self.said = self.entered = clock()
        self.phase: Phase | None = None
        # Made before the engine starts: earlier runs' lines (the log is appended to) are not this start's.
        self.offset = log_path.stat().st_size if log_path is not None and log_path.exists() else 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial = ""

    def new_lines(self) -> list[str]:
        """The complete lines added since the last call; an unfinished last line waits for its end."""
        if self.log_path is None:
            return []
        try:
            with self.log_path.open("rb") as fh:
                end = fh.seek(0, os.SEEK_END)
                if end < self.offset:  # truncated: start over
                    self.offset, self.partial = 0, ""
                fh.seek(self.offset)
                data = fh.read(end - self.offset)
        except OSError:
            return []
        self.offset += len(data)
        # Progress bars (tqdm) end their updates with \r.
        *lines, partial = (self.partial + self.decoder.decode(data)).replace("\r", "\n").split("\n")
        self.partial = partial[-MAX_LINE_CHARS:]
        return lines

    def say(self, text: str) -> None:
        self.said = self.clock()
        self.screen.line(f"{self.label}: {text}, {self.said - self.started:.0f} s")

    def enter(self, phase: Phase) -> None:
        self.phase = phase
        self.say(phase)
        self.entered = self.said

    def poll(self) -> None:
        if self.phase is None:
            self.enter(Phase.STARTING)
        for line in self.new_lines():
            phase = classify(line)
            if phase is not None and self.phase is not None and ORDER[phase] > ORDER[self.phase]:
                self.enter(phase)
        now = self.clock()
        if self.phase is Phase.WARMING and now - self.entered >= FIRST_COMPILE_AFTER:
            self.enter(Phase.FIRST_COMPILE)
        if self.screen.live:
            self.screen.show(self.label, f"{self.label}: {self.phase}, {now - self.started:.0f} s")
        elif self.phase is not Phase.READY and now - self.said >= STILL_EVERY_SECONDS:
            self.say(f"still {self.phase}")

    def finish(self, ready: bool) -> None:
        """The engine answered its health check (ready) or did not: say ready once, leave no status line."""
        self.screen.show(self.label, None)
        if ready and self.phase is not Phase.READY:
            self.enter(Phase.READY)

    async def run(self) -> None:
        while True:
            self.poll()
            await asyncio.sleep(POLL_SECONDS)


@asynccontextmanager
async def shown(progress: StartProgress) -> AsyncIterator[None]:
    """Show `progress` while the body (the wait for the engine's health) runs; stop however the body ends."""
    task = asyncio.create_task(progress.run(), name=f"start progress of {progress.label}")
    ready = False
    try:
        yield
        ready = True
    finally:
        task.cancel()
        # asyncio.wait, not await task: a cancellation of the caller itself must still reach the caller.
        await asyncio.wait({task})
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("showing the start of %s failed: %r", progress.label, exc)
        progress.finish(ready)
