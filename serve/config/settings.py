"""The environment (LLMSERVE_* variables) and the state folder every command shares."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve.config.loader import ConfigError

ENV_PREFIX = "LLMSERVE_"
REDIS_URL_PATTERN = r"^(redis|rediss|unix)://"
# What `llmserve up` serves when neither --model nor LLMSERVE_MODEL names a file (relative to the working directory).
DEFAULT_MODEL_FILE = Path("configs/models/smollm2-135m-cpu.yaml")


def env_name(field: str) -> str:
    """The environment variable of an Environment field."""
    return ENV_PREFIX + field.upper()


def default_cache() -> Path:
    # The XDG base directory spec's cache, as vLLM and Hugging Face use it.
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmserve"


@dataclass(frozen=True)
class StateFolder:
    """What `up`, `gateway`, `keys` and `bench` keep on this machine: keys, the dev key, the engine key, logs."""

    root: Path

    @property
    def keys_file(self) -> Path:
        return self.root / "keys.yaml"

    @property
    def dev_key(self) -> Path:
        """The plain key `up` prints, readable by the user only."""
        return self.root / "dev-key"

    @property
    def engine_key(self) -> Path:
        """The engines' internal key, so tools on this machine can reach the engines of a running `up`."""
        return self.root / "engine-key"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        """Files of the running stack (the gateway's runtime settings, Ray Serve ready markers)."""
        return self.root / "run"

    @property
    def runtime_gateway(self) -> Path:
        """The gateway settings `up` writes for its gateway: the model files and the engines it started."""
        return self.run / "gateway.yaml"


class Environment(BaseSettings):
    """LLMSERVE_* variables. Unset ones take the default here, or (None) the setting of the file or flag."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", frozen=True)

    # The state folder, relative to the working directory.
    home: Path = Path(".llmserve")
    # Prepared weights (converted bundled models, synthetic models).
    cache: Path = Field(default_factory=default_cache)
    # `up`'s model file when --model is not given.
    model: Path = DEFAULT_MODEL_FILE
    # `up`'s gateway address over the gateway file's (a --host/--port flag wins over both).
    host: str | None = Field(default=None, min_length=1)
    port: int | None = Field(default=None, ge=0, le=65535)
    # The key between gateway and engines. `up` keeps one in the state folder when this is unset.
    engine_key: SecretStr | None = None
    # Redis for per-key limits shared by gateway replicas (limits.backend: redis); a URL may hold a password.
    redis_url: SecretStr | None = None
    # The bearer key /metrics asks for (Prometheus' scrape credentials). Unset: /metrics answers loopback only.
    metrics_key: SecretStr | None = None

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: SecretStr | None) -> SecretStr | None:
        # The message never repeats the value: it may carry a password.
        if url is not None and not re.match(REDIS_URL_PATTERN, url.get_secret_value()):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        return url

    @property
    def state(self) -> StateFolder:
        return StateFolder(self.home)


def environment() -> Environment:
    """Read the environment now (tests and child processes change it), naming the variable that is wrong."""
    try:
        return Environment()
    except ValidationError as exc:
        problems = "; ".join(f"{env_name(str(err['loc'][0]))}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"environment: {problems}") from exc


ENGINE_KEY_ENV = env_name("engine_key")
