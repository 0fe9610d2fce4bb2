"""Engine start progress: vLLM log lines to phases, the log tailer on a growing file, and its wiring in `up`."""

from __future__ import annotations

import asyncio
import io
import sys
import time
from pathlib import Path

import pytest

from serve.cli import parser, stack_for
from serve.engine import progress as progress_module
from serve.engine.process import ChildProcess, ProcessStartError
from serve.engine.progress import Phase, Screen, StartProgress, classify, shown
from serve.stack import start_engines

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def vllm(message: str, source: str = "EngineCore_DP0 pid=4242") -> str:
    """A line as vLLM 0.32 writes it to a file (vllm/logger.py's format, no colour)."""
    return f"({source}) INFO 11-26 15:50:07 [file.py:1] {message}"


# Each message is the format string of the vLLM (or uvicorn) source named in serve/engine/progress.py, filled in.
COLD_START = [
    vllm("Initializing a V1 LLM engine (v0.32.0) with config: model='/cache/smollm2', dtype=torch.float32"),
    vllm("Starting to load model /home/u/.cache/llmserve/smollm2-135m-instruct..."),
    vllm("Initializing model took 0.051234 seconds"),
    vllm("Loading weights took 0.21 seconds"),
    vllm("Warming up model for the compilation..."),
    vllm("Starting torch.compile"),
    vllm(
        "Using cache directory: /home/u/.cache/vllm/torch_compile_cache/0a1b2c3d4e/rank_0_0/backbone for vLLM's"
        " torch.compile"
    ),
    vllm("Dynamo bytecode transform time: 8.21 s"),
    vllm("Cache the graph of compile range (1, 2048) for later use"),
    vllm("Compiling a graph for compile range (1, 2048) takes 71.40 s"),
    vllm("torch.compile and initial profiling/warmup run together took 84.02 s in total"),
    vllm("Warming up done."),
    vllm("Explicitly set (2.00/7.75) GiB for KV cache on node 0."),
    vllm("CPU KV cache size: 87,381 tokens, Maximum concurrency for 2,048 tokens per request: 42.67x"),
    vllm("init engine (profile, create kv cache, warmup model) took 86.53 s (compilation: 84.02 s)"),
    vllm("Starting vLLM server on http://127.0.0.1:41234", "APIServer pid=4200"),
    "INFO:     Waiting for application startup.",
    "INFO:     Application startup complete.",
]
COLD_PHASES = [
    Phase.STARTING,
    Phase.LOADING,
    Phase.WARMING,
    Phase.COMPILING,
    Phase.FIRST_COMPILE,
    Phase.KV_CACHE,
    Phase.SERVER,
    Phase.READY,
]


@pytest.mark.parametrize(
    ("line", "phase"),
    [
        (vllm("Starting to load model /models/smollm2..."), Phase.LOADING),
        (vllm("Loading model from scratch..."), Phase.LOADING),
        (vllm("Warming up model for the compilation..."), Phase.WARMING),
        (vllm("Starting torch.compile"), Phase.COMPILING),
        (vllm("[backbone] Dynamo bytecode transform time: 8.21 s"), Phase.COMPILING),
        (vllm("Cache the graph of compile range (1, 2048) for later use"), Phase.FIRST_COMPILE),
        (vllm("Compiling a graph for compile range (1, 2048) takes 71.40 s"), Phase.FIRST_COMPILE),
        (
            vllm("Directly load the compiled graph(s) for compile range (1, 2048) from the cache, took 0.842 s"),
            Phase.CACHED_COMPILE,
        ),
        (
            vllm("Directly load AOT compilation from path /home/u/.cache/vllm/torch_compile_cache/x/rank_0_0/model"),
            Phase.CACHED_COMPILE,
        ),
        (
            vllm("Auto set (3.10/7.75) GiB for KV cache on node 0, with 4.00 GiB requested memory for the worker."),
            Phase.KV_CACHE,
        ),
        (vllm("Available KV cache memory: 61.2 GiB"), Phase.KV_CACHE),
        (
            vllm("GPU KV cache size: 1,002,112 tokens, Maximum concurrency for 4,096 tokens per request: 244.66x"),
            Phase.KV_CACHE,
        ),
        (
            "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  51%|#####     | 34/67 [00:02<00:02]",
            Phase.CAPTURING,
        ),
        (vllm("init engine (profile, create kv cache, warmup model) took 31.07 s"), Phase.SERVER),
        (vllm("Starting vLLM server on http://127.0.0.1:41234", "APIServer pid=4200"), Phase.SERVER),
        ("INFO:     Application startup complete.", Phase.READY),
        # Lines that say nothing about a phase change.
        (vllm("Initializing a V1 LLM engine (v0.32.0) with config: model='/m', compilation_config={...}"), None),
        (vllm("Loading weights took 0.21 seconds"), None),
        (vllm("Warming up done."), None),
        (vllm("Using cache directory: /c/torch_compile_cache/0a1b/rank_0_0/backbone for vLLM's torch.compile"), None),
        ("INFO:     Waiting for application startup.", None),
        ("", None),
    ],
)
def test_a_vllm_line_names_its_phase(line: str, phase: Phase | None) -> None:
    assert classify(line) == phase


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tailer(log: Path, live: bool = False) -> tuple[StartProgress, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    return StartProgress("engine", log, Screen(out, live=live), clock=clock), out, clock


def append(log: Path, text: str) -> None:
    with log.open("a", encoding="utf-8") as fh:
        fh.write(text)


def said(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_a_cold_start_is_shown_phase_by_phase_from_the_new_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    # An earlier run's lines: the log is appended to, and they are not this start's.
    log.write_text(vllm("Starting torch.compile") + "\nINFO:     Application startup complete.\n")
    progress, out, clock = tailer(log)
    progress.poll()
    assert said(out) == ["engine: starting, 0 s"]
    for line in COLD_START:
        clock.now += 1
        # Each line arrives in two writes: half a line is not classified until its end is written.
        append(log, line[: len(line) // 2])
        progress.poll()
        append(log, line[len(line) // 2 :] + "\n")
        progress.poll()
    phases = [text.removeprefix("engine: ").rsplit(", ", 1)[0] for text in said(out)]
    assert phases == [str(p) for p in COLD_PHASES]
    assert "engine: compiling (first start: cached for the next one), 9 s" in said(out)
    assert said(out)[-1] == f"engine: ready, {len(COLD_START)} s"
    progress.finish(ready=True)
    assert said(out)[-1] == f"engine: ready, {len(COLD_START)} s", "ready is said once"


def test_a_line_counts_only_once_its_end_is_written(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    progress, out, clock = tailer(log)
    append(log, vllm("Starting to load model /models/smollm2"))
    progress.poll()
    assert said(out) == ["engine: starting, 0 s"]
    clock.now += 2
    append(log, "-135m-instruct...\n")
    progress.poll()
    assert said(out) == ["engine: starting, 0 s", "engine: loading weights, 2 s"]


def test_a_warm_start_says_the_compiled_graph_came_from_the_cache(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    progress, out, _ = tailer(log)
    append(
        log,
        "\n".join(
            [
                vllm("Starting torch.compile"),
                vllm("Dynamo bytecode transform time: 7.90 s"),
                vllm("Directly load the compiled graph(s) for compile range (1, 2048) from the cache, took 0.842 s"),
                "",
            ]
        ),
    )
    progress.poll()
    assert said(out) == [
        "engine: starting, 0 s",
        "engine: compiling, 0 s",
        "engine: warming up (compiled graph loaded from the cache), 0 s",
    ]
    assert "first start" not in out.getvalue()


def test_unknown_lines_say_nothing_and_waiting_is_said_at_most_every_15_s(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    progress, out, clock = tailer(log)
    progress.poll()
    for _ in range(14):
        clock.now += 1
        append(log, vllm("Loading weights took 0.21 seconds") + "\nsome other line\n")
        progress.poll()
    assert said(out) == ["engine: starting, 0 s"]
    clock.now += 1
    progress.poll()
    clock.now += 10
    progress.poll()
    clock.now += 5
    progress.poll()
    assert said(out) == ["engine: starting, 0 s", "engine: still starting, 15 s", "engine: still starting, 30 s"]


def test_a_phase_never_goes_back(tmp_path: Path) -> None:
    """Two tensor-parallel ranks log the same steps a little apart."""
    log = tmp_path / "engine.log"
    progress, out, _ = tailer(log)
    append(log, vllm("Cache the graph of compile range (1, 2048) for later use", "Worker_TP0 pid=1") + "\n")
    append(log, vllm("Starting torch.compile", "Worker_TP1 pid=2") + "\n")
    append(log, vllm("Starting to load model /m...", "Worker_TP1 pid=2") + "\n")
    progress.poll()
    assert said(out) == ["engine: starting, 0 s", "engine: compiling (first start: cached for the next one), 0 s"]


def test_bytes_already_read_are_not_read_again(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    progress, out, _ = tailer(log)
    first = vllm("Loading weights took 0.21 seconds") + "\n"
    append(log, first)
    progress.poll()
    # Rewritten in place, same size: only bytes past what was read could change what is shown.
    log.write_text(vllm("Starting to load model /m...").ljust(len(first) - 1) + "\n")
    progress.poll()
    assert said(out) == ["engine: starting, 0 s"]
    append(
        log, "\r".join(["Capturing CUDA graphs (decode, FULL):   0%|", "Capturing CUDA graphs (decode, FULL): 50%|"])
    )
    progress.poll()
    assert said(out)[-1] == "engine: capturing CUDA graphs, 0 s", "a progress bar's \\r ends a line"


def test_a_terminal_gets_one_status_line_rewritten_in_place(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    progress, out, clock = tailer(log, live=True)
    progress.poll()
    clock.now += 3
    progress.poll()
    append(log, vllm("Starting to load model /m...") + "\n")
    progress.poll()
    progress.finish(ready=True)
    assert out.getvalue() == (
        "engine: starting, 0 s\n"
        "engine: starting, 0 s"
        "\r\x1b[Kengine: starting, 3 s"
        "\r\x1b[Kengine: loading weights, 3 s\nengine: starting, 3 s"
        "\r\x1b[Kengine: loading weights, 3 s"
        "\r\x1b[K"
        "engine: ready, 3 s\n"
    )


def progress_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("start progress of")]


async def test_shown_stops_its_task_however_the_wait_ends(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    progress, out, _ = tailer(log)
    async with asyncio.timeout(10), shown(progress):  # a task left running would hang the exit: fail instead
        await asyncio.sleep(0.05)
        assert len(progress_tasks()) == 1
    assert progress_tasks() == []
    assert said(out) == ["engine: starting, 0 s", "engine: ready, 0 s"]

    progress, out, _ = tailer(log)
    with pytest.raises(ProcessStartError):
        async with asyncio.timeout(10), shown(progress):
            await asyncio.sleep(0.05)
            raise ProcessStartError("engine exited")
    assert progress_tasks() == []
    assert said(out) == ["engine: starting, 0 s"], "a failed engine is not called ready"

    progress, out, _ = tailer(log)

    async def wait_forever() -> None:
        async with shown(progress):
            await asyncio.Event().wait()

    waiting = asyncio.create_task(wait_forever())
    await asyncio.sleep(0.05)
    waiting.cancel()
    async with asyncio.timeout(10):
        await asyncio.wait({waiting})
    assert waiting.cancelled()
    assert progress_tasks() == []


async def test_up_shows_each_engine_start_from_its_log_and_stops_showing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(progress_module, "POLL_SECONDS", 0.01)
    monkeypatch.setattr("serve.stack.prepare_model", lambda model: tmp_path)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    stack = stack_for(parser().parse_args(["up"]))
    log = stack.state.logs / f"engine-{stack.models[0][1].name}-0.log"
    log.parent.mkdir(parents=True)
    log.write_text("INFO:     Application startup complete.\n")  # the previous run's

    async def start(self: ChildProcess) -> None:
        assert self.log_path == log

    async def wait_healthy(self: ChildProcess, url: str, within: float, interval: float = 1.0) -> None:
        """The engine writes its log; each line is waited on until `up` has shown its phase."""
        for line in COLD_START[:-1]:
            append(log, line + "\n")
            deadline = time.monotonic() + 10
            while (phase := classify(line)) is not None and f": {phase}, " not in err.getvalue():
                assert time.monotonic() < deadline, f"{phase} was not shown"
                await asyncio.sleep(0.01)
        if fail:
            raise ProcessStartError("engine exited with code 1")

    monkeypatch.setattr(ChildProcess, "start", start)
    monkeypatch.setattr(ChildProcess, "wait_healthy", wait_healthy)
    fail = False
    async with asyncio.timeout(30):
        await start_engines(stack, "engine-key")
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("waiting for 1 engine(s)")
    assert [text.removeprefix("engine: ").rsplit(", ", 1)[0] for text in lines[1:]] == [str(p) for p in COLD_PHASES]
    assert progress_tasks() == []

    stack.engines.clear()
    err.truncate(0)
    err.seek(0)
    fail = True
    with pytest.raises(ProcessStartError):
        async with asyncio.timeout(30):
            await start_engines(stack, "engine-key")
    assert progress_tasks() == []
    assert err.getvalue().splitlines()[-1].startswith("engine: starting the API server, "), "not ready"


async def test_several_engines_are_named_and_one_failing_stops_showing_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(progress_module, "POLL_SECONDS", 0.01)
    monkeypatch.setattr("serve.stack.prepare_model", lambda model: tmp_path)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    models = ["configs/models/smollm2-135m-cpu.yaml", "configs/models/minilm-l6-embed-cpu.yaml"]
    stack = stack_for(parser().parse_args(["up", *(arg for m in models for arg in ("--model", m))]))

    async def start(self: ChildProcess) -> None:
        assert self.log_path is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    async def wait_healthy(self: ChildProcess, url: str, within: float, interval: float = 1.0) -> None:
        assert self.log_path is not None
        append(self.log_path, vllm("Starting to load model /m...") + "\n")
        if "minilm" not in self.name:
            await asyncio.Event().wait()  # still starting when the other fails
        deadline = time.monotonic() + 10
        while err.getvalue().count(": loading weights, ") < 2:
            assert time.monotonic() < deadline, "the engines' loading was not shown"
            await asyncio.sleep(0.01)
        raise ProcessStartError(f"{self.name} exited with code 1")

    monkeypatch.setattr(ChildProcess, "start", start)
    monkeypatch.setattr(ChildProcess, "wait_healthy", wait_healthy)
    with pytest.raises(ProcessStartError):
        async with asyncio.timeout(30):
            await start_engines(stack, "engine-key")
    assert progress_tasks() == [], "the engine still starting is no longer shown"
    said = err.getvalue().splitlines()
    for engine in stack.engines:
        assert f"{engine.child.name}: starting, 0 s" in said
    assert not [line for line in said if line.startswith("engine:")], "several engines: each line names its engine"
    assert not [line for line in said if ": ready" in line]


def test_on_cpu_a_long_warm_up_is_shown_as_the_first_start_compile_and_a_short_one_is_not(tmp_path: Path) -> None:
    # vLLM's CPU backend compiles inside "Warming up model for the compilation..." without a line of its own.
    warm_up = vllm("Warming up model for the compilation...") + "\n"
    for seconds, first_start in ((20, False), (80, True)):
        log = tmp_path / f"engine-{seconds}.log"
        progress, out, clock = tailer(log)
        append(log, warm_up)
        progress.poll()
        for _ in range(seconds):
            clock.now += 1
            progress.poll()
        append(log, vllm("Explicitly set (2.0/23.59) GiB for KV cache on node 0.") + "\n")
        progress.poll()
        phases = [text.removeprefix("engine: ").rsplit(", ", 1)[0] for text in said(out) if "still" not in text]
        expected = ["starting", "warming up", "allocating KV cache"]
        if first_start:
            expected.insert(2, "compiling (first start: cached for the next one)")
        assert phases == expected, seconds
