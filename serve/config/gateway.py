"""Gateway settings: where it listens, which model files it serves and where their engines are."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from serve.config.loader import ConfigError, load_model
from serve.config.model_file import ModelFile, Strict, load_model_file

ENGINE_KEY_ENV = "LLMSERVE_ENGINE_KEY"
REDIS_URL_ENV = "LLMSERVE_REDIS_URL"


class LimitsSettings(Strict):
    """Where per-key limits are counted: in each gateway process, or in one Redis shared by every replica."""

    backend: Literal["memory", "redis"] = "memory"
    # A URL may carry a password, so the environment (LLMSERVE_REDIS_URL) is the better place for it.
    redis_url: str | None = Field(default=None, pattern=r"^(redis|rediss|unix)://")
    key_prefix: str = Field(default="llmserve:limits:", min_length=1)
    # How long the concurrency slots of a gateway that died stay taken; a live gateway renews its own.
    slot_lease: float = Field(default=60.0, ge=3)
    # Connect and reply timeout for each Redis call: a hung Redis must not hang admission.
    redis_timeout: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _redis_needs_url(self) -> LimitsSettings:
        if self.backend == "redis" and not self.resolved_redis_url():
            raise ValueError(f"backend redis needs redis_url (or the environment variable {REDIS_URL_ENV})")
        return self

    def resolved_redis_url(self) -> str | None:
        return self.redis_url or os.environ.get(REDIS_URL_ENV) or None


class ModelEntry(Strict):
    """A model file the gateway serves, and the engine URLs for it (overrides the file's own endpoints)."""

    file: Path
    endpoints: list[str] = Field(default_factory=list)
    # Folder with tokenizer.json (and chat template) for counting prompt tokens; overrides the model file's.
    tokenizer: Path | None = None


class GatewayFile(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    keys_file: Path = Path(".llmserve/keys.yaml")
    models: list[ModelEntry] = Field(default_factory=list)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    max_header_bytes: int = Field(default=32 * 1024, gt=0)
    health_interval: float = Field(default=2.0, gt=0)
    # Seconds requests in flight may take to finish after SIGTERM.
    drain_timeout: float = Field(default=30.0, ge=0)
    log_level: str = "info"
    limits: LimitsSettings = Field(default_factory=LimitsSettings)


@dataclass(frozen=True)
class ModelRoute:
    """A model file resolved for routing: its policy and the base URLs of its engines."""

    model: ModelFile
    endpoints: tuple[str, ...]
    tokenizer: Path | None = None


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
        if not endpoints and model.discovery is None:
            raise ConfigError(
                f"{path}: no endpoints: list them (or a discovery name) in the model file or the gateway's models entry"
            )
        tokenizer = entry.tokenizer or (Path(model.tokenizer) if model.tokenizer else None)
        routes.append(
            ModelRoute(
                model=model,
                endpoints=tuple(url.rstrip("/") for url in endpoints),
                tokenizer=resolve(base_dir, tokenizer) if tokenizer else None,
            )
        )
    key = engine_key if engine_key is not None else os.environ.get(ENGINE_KEY_ENV)
    return GatewaySettings(file=file, routes=tuple(routes), engine_key=key or None, base_dir=base_dir)


def load_gateway_settings(path: Path) -> GatewaySettings:
    file = load_model(GatewayFile, path, empty_ok=True)
    return build_settings(file, base_dir=Path.cwd())
