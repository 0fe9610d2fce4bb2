"""The soak tier: its length (SOAK_SECONDS) and its engine: the session's e2e stack when this session has one,
else a stack of its own whose model file batches fewer sequences, so that a few dozen users overload it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from serve.config.model_file import load_model_file
from tests.e2e.conftest import RunningStack, start_stack, stop_and_check
from tests.soak.figures import Figures
from tests.soak.run import Engine

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOAK_SECONDS = 600.0
BASE_MODEL_FILE = ROOT / "configs" / "models" / "smollm2-135m-cpu.yaml"
OWN_MAX_NUM_SEQS = 8
FIGURES = pytest.StashKey[Figures]()


def soak_seconds() -> float:
    raw = os.environ.get("SOAK_SECONDS")
    if not raw:
        return DEFAULT_SOAK_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        raise pytest.UsageError(f"SOAK_SECONDS must be a number of seconds, got {raw!r}") from None
    if seconds < 60:
        raise pytest.UsageError(f"SOAK_SECONDS must be at least 60 (warm-up, two faults and their recovery): {raw}")
    return seconds


def engine_of(stack: RunningStack) -> Engine:
    """The stack's engine as the soak sees it: its model file and tokenizer as `up` handed them to its gateway."""
    runtime = yaml.safe_load((stack.home / "run" / "gateway.yaml").read_text())
    entry = runtime["models"][0]
    model = load_model_file(Path(entry["file"]))
    if model.engine.max_num_seqs is None:
        pytest.fail(f"{entry['file']}: the soak needs engine.max_num_seqs to know how many users overload it")

    def pid() -> int:
        return next(
            p.pid
            for p in stack.descendants()
            if "vllm.entrypoints" in " ".join(p.cmdline()) and p.ppid() == stack.proc.pid
        )

    logs = (stack.home / "up.log", *sorted((stack.home / "logs").glob("*.log")))
    return Engine(
        url=stack.engine_url,
        key=stack.engine_key,
        model_file=entry["file"],
        tokenizer=entry.get("tokenizer"),
        max_num_seqs=model.engine.max_num_seqs,
        pid=pid,
        logs=logs,
    )


def session_stack(request: pytest.FixtureRequest) -> RunningStack | None:
    """The e2e tier's session stack, when this session runs tests that use it and its fixture is visible here."""
    if not any("stack" in getattr(item, "fixturenames", ()) for item in request.session.items):
        return None
    try:
        stack: RunningStack = request.getfixturevalue("stack")
    except pytest.FixtureLookupError:
        return None
    return stack


@pytest.fixture(scope="session")
def soak_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    shared = session_stack(request)
    if shared is not None:
        yield engine_of(shared)
        return
    folder = tmp_path_factory.mktemp("soak-stack")
    model_file = folder / "smollm2-soak.yaml"
    # The name written out too: start_stack reads it from the file itself, without following `extends`.
    derived = {
        "extends": str(BASE_MODEL_FILE),
        "name": load_model_file(BASE_MODEL_FILE).name,
        "engine": {"max_num_seqs": OWN_MAX_NUM_SEQS},
    }
    model_file.write_text(yaml.safe_dump(derived))
    running = start_stack(folder / "home", str(model_file))
    try:
        yield engine_of(running)
    finally:
        stop_and_check(running)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, None)
    if figures is not None:
        terminalreporter.section("soak")
        terminalreporter.write_line(figures.summary())
