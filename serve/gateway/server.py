"""Running the gateway under uvicorn: the bounded HTTP protocol, drain on SIGTERM/SIGINT, one process or several."""

from __future__ import annotations

import contextlib
import logging
import resource
from collections.abc import Generator
from types import FrameType

import uvicorn

from serve.config.gateway import GatewayFile, GatewaySettings
from serve.gateway.app import create_app
from serve.gateway.drain import Drain
from serve.gateway.http_protocol import BoundedHttpToolsProtocol, ConnectionStats, HttpLimits, bounded_protocol

log = logging.getLogger(__name__)

# What run_gateway exits with when the lifespan failed (a model file, the keys file, Redis), as uvicorn.run does.
STARTUP_FAILURE = 3
# Descriptors beyond two per client connection (it and its engine connection): listeners, logs, health checks.
FD_RESERVE = 256


class GatewayServer(uvicorn.Server):
    """The first stop (SIGTERM/SIGINT, or the supervisor's word) drains: readiness 503, new requests 503, in-flight
    finish; a second one exits now. A worker under a supervisor takes no signals of its own."""

    def __init__(
        self, config: uvicorn.Config, drain: Drain, own_signals: bool = True, http_stats: ConnectionStats | None = None
    ) -> None:
        super().__init__(config)
        self.drain = drain
        self.own_signals = own_signals
        # Connections held and refused by the HTTP protocol, for metrics.
        self.http_stats = http_stats or ConnectionStats()
        drain.on_done = self._drained

    def _drained(self) -> None:
        self.should_exit = True

    def stop(self) -> None:
        """Safe from a signal handler or another thread: it sets flags the event loop polls, or begins the drain."""
        if self.drain.active:
            self.should_exit = True
        else:
            self.drain.begin()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stop()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if self.own_signals:
            with super().capture_signals():
                yield
        else:
            yield


def http_limits(file: GatewayFile) -> HttpLimits:
    return HttpLimits(
        max_head_bytes=file.max_header_bytes,
        header_timeout=file.header_timeout,
        body_timeout=file.body_timeout,
        body_min_rate=file.body_min_rate,
        max_connections=file.max_connections,
    )


def uvicorn_config(settings: GatewaySettings, app: object, protocol: type[BoundedHttpToolsProtocol]) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.file.host,
        port=settings.file.port,
        http=protocol,
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        # The gateway reads no X-Forwarded-* header: no middleware rewriting each request's client for it.
        proxy_headers=False,
        # No "server: uvicorn" on every answer (nothing for a caller to fingerprint).
        server_header=False,
        # The drain already waited for requests in flight; this only bounds the last connection close.
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.file.keep_alive_timeout,  # type: ignore[arg-type]
    )


def raise_fd_limit(file: GatewayFile) -> None:
    """Each client connection may hold an engine connection too: lift the soft descriptor limit to what the
    connection cap needs (up to the hard limit), and say so when even that is too low."""
    needed = 2 * file.max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open file limit %d is below the %d that max_connections=%d needs: raise `ulimit -n`",
            soft,
            needed,
            file.max_connections,
        )


def gateway_server(settings: GatewaySettings, own_signals: bool = True) -> GatewayServer:
    drain = Drain(settings.file.drain_timeout)
    protocol = bounded_protocol(http_limits(settings.file))
    app = create_app(settings, drain)
    # What the HTTP server refused before the app saw a request (431, 408, 503 past the cap) shows in /metrics too.
    app.metrics.watch_http(protocol.stats)
    config = uvicorn_config(settings, app, protocol)
    return GatewayServer(config, drain, own_signals=own_signals, http_stats=protocol.stats)
