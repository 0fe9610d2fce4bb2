"""A real gateway (uvicorn on loopback) in front of a fault-injecting fake engine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve.config.gateway import GatewayFile, build_settings
from serve.config.keys import create_key
from serve.gateway.app import create_app
from tests.integration.fake_engine import FakeEngine
from tests.servers import free_port, run_server

ENGINE_KEY = "internal-engine-key"


@dataclass
class Gateway:
    url: str
    key: str
    engine: FakeEngine
    keys_path: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def model_file(
    tmp_path: Path,
    name: str,
    endpoint: str | list[str],
    aliases: list[str],
    policy: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    path = tmp_path / f"{name}.yaml"
    data = {
        "name": name,
        "aliases": aliases,
        "source": "org/model",
        "engine": {"device": "cpu", "max_model_len": 2048},
        "policy": {"max_tokens_cap": 100, "default_max_tokens": 16, "defaults": {"temperature": 0.3}, **(policy or {})},
        "endpoints": [endpoint] if isinstance(endpoint, str) else endpoint,
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


@contextmanager
def gateway_for(tmp_path: Path, models: list[Path], engine: FakeEngine, **settings: Any) -> Iterator[Gateway]:
    """A real gateway on loopback serving the given model files."""
    keys_path = tmp_path / "keys.yaml"
    key, _ = create_key(keys_path, "test")
    file = GatewayFile.model_validate(
        {
            "keys_file": keys_path,
            "models": [{"file": m} for m in models],
            "max_body_bytes": 64 * 1024,
            "health_interval": 0.5,
            **settings,
        }
    )
    with run_server(create_app(build_settings(file, base_dir=tmp_path, engine_key=ENGINE_KEY))) as url:
        yield Gateway(url=url, key=key, engine=engine, keys_path=keys_path)


@pytest.fixture
def fake_engine() -> Iterator[tuple[FakeEngine, str]]:
    engine = FakeEngine()
    with run_server(engine.app()) as url:
        yield engine, url


@pytest.fixture
def gateway(tmp_path: Path, fake_engine: tuple[FakeEngine, str]) -> Iterator[Gateway]:
    engine, engine_url = fake_engine
    # A second model whose engine is not listening: requests for it meet a dead endpoint.
    dead = f"http://127.0.0.1:{free_port()}"
    models = [model_file(tmp_path, "fake-model", engine_url, ["fake"]), model_file(tmp_path, "dead-model", dead, [])]
    with gateway_for(tmp_path, models, engine) as gw:
        yield gw
