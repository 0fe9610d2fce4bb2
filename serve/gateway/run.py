"""`llmserve gateway`: one gateway process (serve.gateway.server), or several on one port (serve.gateway.workers)."""

from __future__ import annotations

import sys

from serve.config.gateway import GatewaySettings
from serve.gateway.server import STARTUP_FAILURE, gateway_server, raise_fd_limit
from serve.gateway.workers import run_workers
from serve.logs import setup_logging


def run_gateway(settings: GatewaySettings) -> None:
    setup_logging(settings.file.log_level, access_log=True)
    raise_fd_limit(settings.file)
    if settings.file.workers > 1:
        sys.exit(run_workers(settings))
    server = gateway_server(settings)
    server.run()
    if not server.started:
        # The lifespan failed (a model file, the keys file, Redis): say so with the exit code, as uvicorn.run does.
        sys.exit(STARTUP_FAILURE)
