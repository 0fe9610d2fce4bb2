"""`up`'s supervision with real child processes: an engine that dies is restarted, every time it dies."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from serve.config.model_file import ModelFile
from serve.engine.process import ChildProcess
from serve.stack import Engine, keep_alive
from tests.servers import free_port

MODEL = ModelFile.model_validate(
    {
        "name": "m",
        "source": "a/b",
        "engine": {"max_model_len": 512, "startup_timeout": 20},
        "policy": {"max_tokens_cap": 8},
    }
)


def test_an_engine_is_restarted_each_time_it_dies(tmp_path: Path) -> None:
    (tmp_path / "health").write_text("ok")  # http.server answers GET /health with this file: a stand-in engine
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    engine = Engine(model=MODEL, url=f"http://127.0.0.1:{port}", child=ChildProcess("stand-in", argv, {}, None))

    async def scenario() -> list[int]:
        stop = asyncio.Event()
        await engine.child.start()
        await engine.child.wait_healthy(engine.health_url, within=20, interval=0.1)
        keeper = asyncio.create_task(keep_alive(engine, stop))
        pids = [engine.child.pid or 0]
        try:
            for _ in range(3):
                os.kill(pids[-1], signal.SIGKILL)
                async with asyncio.timeout(30):
                    while engine.child.pid == pids[-1] or not engine.child.running:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                await engine.child.wait_healthy(engine.health_url, within=20, interval=0.1)
                pids.append(engine.child.pid or 0)
        finally:
            stop.set()
            keeper.cancel()
            await engine.child.stop(grace=5)
        return pids

    pids = asyncio.run(scenario())
    assert len(set(pids)) == 4, f"not restarted after every death: {pids}"
    assert not engine.child.running
