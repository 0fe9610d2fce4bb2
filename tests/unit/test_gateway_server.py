"""The gateway server's settings: --workers over the file's, the HTTP limits from the gateway file, the fd limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from serve.cli import gateway_settings_for, parser
from serve.config.gateway import GatewayFile
from serve.gateway import server
from serve.gateway.http_protocol import envelope
from serve.gateway.server import http_limits, raise_fd_limit


def settings_file(tmp_path: Path, **data: object) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"keys_file": str(tmp_path / "keys.yaml"), **data}))
    return str(path)


def test_workers_flag_overrides_the_file(tmp_path: Path) -> None:
    path = settings_file(tmp_path, workers=2)
    assert gateway_settings_for(parser().parse_args(["gateway", "--config", path])).file.workers == 2
    flagged = parser().parse_args(["gateway", "--config", path, "--workers", "3"])
    assert gateway_settings_for(flagged).file.workers == 3
    with pytest.raises(SystemExit):
        parser().parse_args(["gateway", "--workers", "0"])


def test_http_limits_come_from_the_gateway_file() -> None:
    file = GatewayFile(max_header_bytes=1000, header_timeout=2, body_timeout=3, body_min_rate=4, max_connections=5)
    limits = http_limits(file)
    assert (limits.max_head_bytes, limits.header_timeout, limits.body_timeout) == (1000, 2, 3)
    assert (limits.body_min_rate, limits.max_connections) == (4, 5)


def test_envelope_is_a_whole_response_that_closes_the_connection() -> None:
    response = envelope(503, "service_unavailable", "too_many_connections", "full", [(b"retry-after", b"1")])
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers[b"connection"] == b"close" and headers[b"retry-after"] == b"1"
    assert int(headers[b"content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error == {"message": "full", "type": "service_unavailable", "param": None, "code": "too_many_connections"}


def test_the_fd_limit_is_raised_to_what_the_connection_cap_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    set_to: list[tuple[int, int]] = []
    monkeypatch.setattr(server.resource, "getrlimit", lambda _: (1024, 1_000_000))
    monkeypatch.setattr(server.resource, "setrlimit", lambda _, limits: set_to.append(limits))
    raise_fd_limit(GatewayFile(max_connections=4096))
    assert set_to == [(2 * 4096 + server.FD_RESERVE, 1_000_000)]


def test_a_hard_fd_limit_too_low_for_the_cap_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server.resource, "getrlimit", lambda _: (256, 1024))
    monkeypatch.setattr(server.resource, "setrlimit", lambda *_: None)
    raise_fd_limit(GatewayFile(max_connections=4096))
    assert "raise `ulimit -n`" in caplog.text
