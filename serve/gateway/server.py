"""Running the gateway under uvicorn: logging, and drain on SIGTERM/SIGINT."""

from __future__ import annotations

import sys
from types import FrameType

import uvicorn

from serve.config.gateway import GatewaySettings
from serve.gateway.app import create_app
from serve.gateway.drain import Drain
from serve.logs import setup_logging


class GatewayServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains (readiness 503, new requests 503, in-flight finish); a second one exits now."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        drain.on_done = self._drained

    def _drained(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.active:
            super().handle_exit(sig, frame)
        else:
            self.drain.begin()


def run_gateway(settings: GatewaySettings) -> None:
    setup_logging(settings.file.log_level, access_log=True)
    drain = Drain(settings.file.drain_timeout)
    app = create_app(settings, drain)
    config = uvicorn.Config(
        app,
        host=settings.file.host,
        port=settings.file.port,
        log_config=None,
        access_log=False,
        # The drain already waited for requests in flight; this only bounds the last connection close.
        timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
    )
    server = GatewayServer(config, drain)
    server.run()
    if not server.started:
        # The lifespan failed (a model file, the keys file, Redis): say so with the exit code, as uvicorn.run does.
        sys.exit(3)
