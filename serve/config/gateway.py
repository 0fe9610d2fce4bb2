"""Gateway settings: where it listens, which model files it serves and where their engines are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from serve.config.loader import ConfigError, Data, Strict, read_mapping, resolve_path, validate
from serve.config.model_file import ModelFile, load_model_file
from serve.config.settings import REDIS_URL_PATTERN, StateFolder, env_name, environment


class LimitsSettings(Strict):
    """Where per-key limits are counted: in each gateway process, or in one Redis shared by every replica."""

    backend: Literal["memory", "redis"] = "memory"
    # A URL may carry a password, so the environment (LLMSERVE_REDIS_URL) is the better place for it.
    redis_url: str | None = Field(default=None, pattern=REDIS_URL_PATTERN)
    key_prefix: str = Field(default="llmserve:limits:", min_length=1)
    # How long the concurrency slots of a gateway that died stay taken; a live gateway renews its own.
    slot_lease: float = Field(default=60.0, ge=3)
    # Connect and reply timeout for each Redis call: a hung Redis must not hang admission.
    redis_timeout: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _redis_needs_url(self) -> LimitsSettings:
        if self.backend == "redis" and not self.resolved_redis_url():
            raise ValueError(f"backend redis needs redis_url (or the environment variable {env_name('redis_url')})")
        return self

    def resolved_redis_url(self) -> str | None:
        if self.redis_url:
            return self.redis_url
        url = environment().redis_url
        return url.get_secret_value() if url else None


class ModelEntry(Strict):
    """A model file the gateway serves, and the engine URLs for it (overrides the file's own endpoints)."""

    file: Path
    endpoints: list[str] = Field(default_factory=list)
    # Folder with tokenizer.json (and chat template) for counting prompt tokens; overrides the model file's.
    tokenizer: Path | None = None


class GatewayFile(Strict):
    """The gateway's settings file. Relative paths in it start at its own folder."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Unset: keys.yaml in the state folder (LLMSERVE_HOME), where `llmserve keys` writes by default.
    keys_file: Path | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    max_header_bytes: int = Field(default=32 * 1024, gt=0)
    # The largest SSE event relayed from an engine (prompt_logprobs on a long prompt make big ones); past it the
    # stream ends with an error event.
    max_event_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # The HTTP server's guards against slow clients (serve/gateway/http_protocol.py): seconds from a connection's
    # opening (or a request's first byte) to the end of its head; seconds a body may take, plus one more for every
    # body_min_rate bytes of it that arrived; connections one gateway process holds (past it: 503 with Retry-After).
    header_timeout: float = Field(default=10.0, gt=0)
    body_timeout: float = Field(default=10.0, gt=0)
    body_min_rate: int = Field(default=8 * 1024, gt=0)
    max_connections: int = Field(default=4096, gt=0)
    # Seconds an idle client connection stays open for its next request (above a load balancer's idle timeout).
    keep_alive_timeout: float = Field(default=30.0, gt=0)
    # Gateway processes sharing the port. Per-key limits are shared between them only with limits.backend redis.
    workers: int = Field(default=1, ge=1)
    health_interval: float = Field(default=2.0, gt=0)
    # Seconds requests in flight may take to finish after SIGTERM.
    drain_timeout: float = Field(default=30.0, ge=0)
    log_level: str = "info"
    # Serve the OpenAPI document at /openapi.json (off: it names every served model to anyone who asks).
    openapi: bool = False
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
    keys_path: Path
    # The bearer key /metrics asks for; None: /metrics answers loopback clients only.
    metrics_key: str | None = None


def keys_path(file: GatewayFile, base_dir: Path, state: StateFolder) -> Path:
    """The file's keys file, else the state folder's (the one `llmserve keys` manages)."""
    if file.keys_file is not None:
        return resolve_path(base_dir, file.keys_file)
    return state.keys_file


def resolve_gateway_paths(data: Data, folder: Path) -> Data:
    """keys_file and each model's file and tokenizer, relative to the gateway file's folder."""
    out = dict(data)
    if isinstance(out.get("keys_file"), str):
        out["keys_file"] = str(resolve_path(folder, out["keys_file"]))
    models = out.get("models")
    if isinstance(models, list):
        out["models"] = [
            {**m, **{k: str(resolve_path(folder, m[k])) for k in ("file", "tokenizer") if isinstance(m.get(k), str)}}
            if isinstance(m, dict)
            else m
            for m in models
        ]
    return out


def load_gateway_file(path: Path) -> GatewayFile:
    """The gateway file at `path` (empty means every default), its relative paths made absolute."""
    return validate(GatewayFile, path, resolve_gateway_paths(read_mapping(path, empty_ok=True), path.parent.absolute()))


def build_settings(file: GatewayFile, base_dir: Path, engine_key: str | None = None) -> GatewaySettings:
    """Load the file's model files; relative paths left in `file` start at `base_dir`. The engine key is the
    environment's unless given; without a keys_file the keys are the state folder's."""
    routes: list[ModelRoute] = []
    seen: dict[str, Path] = {}
    for entry in file.models:
        path = resolve_path(base_dir, entry.file)
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
        # The model file's own tokenizer is already relative to the model file's folder.
        if entry.tokenizer is not None:
            tokenizer: Path | None = resolve_path(base_dir, entry.tokenizer)
        else:
            tokenizer = Path(model.tokenizer) if model.tokenizer else None
        routes.append(
            ModelRoute(model=model, endpoints=tuple(url.rstrip("/") for url in endpoints), tokenizer=tokenizer)
        )
    env = environment()
    if engine_key is None and env.engine_key is not None:
        engine_key = env.engine_key.get_secret_value()
    return GatewaySettings(
        file=file,
        routes=tuple(routes),
        engine_key=engine_key or None,
        keys_path=keys_path(file, base_dir, env.state),
        metrics_key=env.metrics_key.get_secret_value() if env.metrics_key is not None else None,
    )
