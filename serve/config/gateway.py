"""Gateway settings: where it listens, which model files it serves and where their engines are."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from serve.config.loader import ConfigError, load_model
from serve.config.model_file import ModelFile, Strict, load_model_file

ENGINE_KEY_ENV = "LLMSERVE_ENGINE_KEY"


class Timeouts(Strict):
    connect: float = Field(default=5.0, gt=0)
    # Longest wait for the next bytes from an engine (first byte or between stream chunks).
    read: float = Field(default=600.0, gt=0)


class ModelEntry(Strict):
    """A model file the gateway serves, and the engine URLs for it (overrides the file's own endpoints)."""

    file: Path
    endpoints: list[str] = Field(default_factory=list)


class GatewayFile(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    keys_file: Path = Path(".llmserve/keys.yaml")
    models: list[ModelEntry] = Field(default_factory=list)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    health_interval: float = Field(default=2.0, gt=0)
    # Seconds requests in flight may take to finish after SIGTERM.
    drain_timeout: float = Field(default=30.0, ge=0)
    log_level: str = "info"


@dataclass(frozen=True)
class ModelRoute:
    """A model file resolved for routing: its policy and the base URLs of its engines."""

    model: ModelFile
    endpoints: tuple[str, ...]


@dataclass(frozen=True)
class GatewaySettings:
    """Everything `create_app` needs, loaded and validated."""

    file: GatewayFile
    routes: tuple[ModelRoute, ...]
    engine_key: str | None
    base_dir: Path

    @property
    def keys_path(self) -> Path:
        return resolve(self.base_dir, self.file.keys_file)


def resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else base / path


def build_settings(file: GatewayFile, base_dir: Path, engine_key: str | None = None) -> GatewaySettings:
    routes: list[ModelRoute] = []
    seen: dict[str, Path] = {}
    for entry in file.models:
        path = resolve(base_dir, entry.file)
        model = load_model_file(path)
        for name in model.names:
            if name in seen:
                raise ConfigError(f"{path}: model name {name!r} is already served by {seen[name]}")
            seen[name] = path
        endpoints = tuple(entry.endpoints) or tuple(str(url).rstrip("/") for url in model.endpoints)
        if not endpoints:
            raise ConfigError(f"{path}: no endpoints: list them in the model file or the gateway's models entry")
        routes.append(ModelRoute(model=model, endpoints=tuple(url.rstrip("/") for url in endpoints)))
    key = engine_key if engine_key is not None else os.environ.get(ENGINE_KEY_ENV)
    return GatewaySettings(file=file, routes=tuple(routes), engine_key=key or None, base_dir=base_dir)


def load_gateway_settings(path: Path) -> GatewaySettings:
    file = load_model(GatewayFile, path, empty_ok=True)
    return build_settings(file, base_dir=Path.cwd())
