"""The model file: one YAML per model holding its engine settings and its gateway policy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, HttpUrl, field_validator, model_validator

from serve.config.field_policy import FieldPolicy
from serve.config.loader import Data, Strict, load_layered, merge_layers, read_layers, resolve_path
from serve.config.ray_settings import RAY_SERVE_HEALTH_PATH, RayServeSettings, RaySettings

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


def safe_name(name: str) -> str:
    """An org/name form is fine, but no empty, "." or ".." segment: names become folder names in the cache."""
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"{name!r}: a name's /-separated parts may not be empty, '.' or '..'")
    return name


# Sampling parameters a model file may give defaults for. Anything else belongs to the client.
SAMPLING_KEYS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "stop",
        "seed",
    }
)

# Flags that the launcher owns: passing them through extra_args would fight the typed settings.
RESERVED_FLAGS = frozenset(
    {
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--api-key",
        "--tensor-parallel-size",
        "-tp",
        "--pipeline-parallel-size",
        "-pp",
        "--max-model-len",
        "--dtype",
        "--enable-lora",
        "--max-loras",
        "--max-lora-rank",
        "--lora-modules",
    }
)


class EngineSettings(Strict):
    """What the vLLM engine is started with. Each field maps to one vLLM flag or environment variable."""

    device: Literal["cpu", "cuda"] = "cuda"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    max_model_len: int = Field(gt=0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    kv_cache_memory_gib: float | None = Field(default=None, gt=0)
    max_num_seqs: int | None = Field(default=None, gt=0)
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    # "priority": vLLM orders its own queue by the request's priority, which the gateway sets from the key's class.
    scheduling_policy: Literal["fcfs", "priority"] | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    quantization: str | None = None
    load_format: str | None = None
    # "vllm" ignores the checkpoint's generation_config.json so the model file's defaults are the only defaults.
    generation_config: str | None = None
    trust_remote_code: bool = False
    # vLLM waits this long for requests in flight when it is asked to stop.
    shutdown_timeout: int = Field(default=30, ge=0)
    # CPU backend: cores each tensor-parallel rank binds to, e.g. "0|1" for two ranks.
    cpu_omp_threads_bind: str | None = None
    replicas: int = Field(default=1, ge=1)
    startup_timeout: float = Field(default=900, gt=0)
    env: dict[str, str] = Field(default_factory=dict)
    extra_args: list[str] = Field(default_factory=list)

    @field_validator("extra_args")
    @classmethod
    def _no_reserved_flags(cls, args: list[str]) -> list[str]:
        for arg in args:
            flag = arg.split("=", 1)[0]
            if flag in RESERVED_FLAGS:
                raise ValueError(f"{flag} is set by a typed field of the model file, not through extra_args")
        return args

    @field_validator("env")
    @classmethod
    def _no_secret_env(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if key in {"VLLM_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}:
                raise ValueError(f"{key} is a secret: it comes from the environment, never from a model file")
        return env

    @property
    def world_size(self) -> int:
        """Number of accelerators one replica needs (tensor parallel x pipeline parallel)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


class SyntheticWeights(Strict):
    """A model made from a config and a tokenizer, with random weights (vLLM's `--load-format dummy`)."""

    # Where the tokenizer comes from, as `source` is written.
    tokenizer_from: str
    config: dict[str, Any]

    @field_validator("config")
    @classmethod
    def _has_architecture(cls, config: dict[str, Any]) -> dict[str, Any]:
        if "model_type" not in config:
            raise ValueError("synthetic config needs model_type (e.g. llama)")
        return config


class Timeouts(Strict):
    """Seconds the gateway waits on an engine; on expiry it closes the engine request (vLLM aborts it)."""

    connect: float = Field(default=5.0, gt=0)
    # Until the engine's first answer bytes: the first SSE event of a stream (prefill plus queueing).
    first_byte: float = Field(default=120.0, gt=0)
    # Longest silence between two stream chunks.
    idle: float = Field(default=60.0, gt=0)
    total: float = Field(default=900.0, gt=0)


class Routing(Strict):
    """How a request picks one of the model's engines."""

    policy: Literal["least_outstanding", "session_affinity", "prefix_affinity"] = "least_outstanding"
    # session_affinity: requests with the same value of this header go to the same engine while it is healthy.
    session_header: str = "x-session-id"
    # prefix_affinity: requests whose first N prompt tokens match go to the same engine (its prefix cache).
    prefix_tokens: int = Field(default=256, gt=0)
    # Requests in flight across the pool beyond which new ones get 503 (None: no cap).
    max_inflight: int | None = Field(default=None, gt=0)
    # Consecutive failures after which an endpoint is ejected until it passes a health check again. Connect errors
    # always count; engine errors (5xx, timeouts, broken streams) count only once they come from at least
    # `eject_min_keys` different API keys, so one tenant's requests cannot get a healthy engine ejected for all.
    eject_after: int = Field(default=3, gt=0)
    eject_min_keys: int = Field(default=2, ge=1)
    # Path of each endpoint that answers 200 when it can take requests (vLLM: /health; Ray Serve: see ray).
    health_path: str = Field(default="/health", pattern=r"^/")


class Scheduling(Strict):
    """The gateway's queue for this model: who waits when the engines are full, and for how long."""

    # Off: every admitted request goes to an engine at once and the engines' own queues decide who waits.
    enabled: bool = True
    # Requests in flight per engine the gateway aims for; None: the engine's max_num_seqs (vLLM's default, 256,
    # when the model file sets none). Engines that report waiting requests get no more until they do not.
    max_running_per_engine: int | None = Field(default=None, gt=0)
    # Places per engine, within that target, kept for interactive requests: standard and batch work is admitted only
    # while at least this many are free, so an interactive request finds one at once however much other work waits.
    interactive_reserve: int = Field(default=0, ge=0)
    # Requests waiting in the gateway for this model; past it, 429 queue_full.
    max_queue: int = Field(default=1024, ge=0)
    # Seconds a request may wait in the gateway's queue; past it, 429 queue_timeout.
    max_queue_wait: float = Field(default=60.0, gt=0)
    # Seconds after which a waiting batch request is served as a standard one, so batch work is never starved.
    max_starvation: float = Field(default=30.0, gt=0)
    # A key's fair share is counted in tokens served: prompt tokens count 1, output tokens this much (VTC).
    output_token_weight: float = Field(default=2.0, gt=0)


class Policy(Strict):
    """What the gateway enforces and fills in for this model."""

    max_tokens_cap: int = Field(default=1024, gt=0)
    default_max_tokens: int | None = Field(default=None, gt=0)
    defaults: dict[str, Any] = Field(default_factory=dict)
    max_messages: int = Field(default=256, gt=0)
    max_n: int = Field(default=4, gt=0)
    # Sequences one request may have the engine generate: the prompts of a completions batch x n (or best_of).
    max_sequences_per_request: int = Field(default=16, gt=0)
    # Which request fields reach the engine, how large, and where media may come from.
    fields: FieldPolicy = Field(default_factory=FieldPolicy)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    routing: Routing = Field(default_factory=Routing)
    scheduling: Scheduling = Field(default_factory=Scheduling)

    @field_validator("defaults")
    @classmethod
    def _only_sampling(cls, defaults: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(defaults) - SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"not sampling parameters: {', '.join(unknown)} (allowed: {sorted(SAMPLING_KEYS)})")
        return defaults

    @model_validator(mode="after")
    def _default_within_cap(self) -> Policy:
        if self.default_max_tokens is not None and self.default_max_tokens > self.max_tokens_cap:
            raise ValueError("default_max_tokens is above max_tokens_cap")
        if self.max_n > self.max_sequences_per_request:
            raise ValueError("max_n is above max_sequences_per_request: such an n would always be refused")
        return self


# Ranks vLLM's --max-lora-rank accepts.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class LoraSettings(Strict):
    """LoRA on the engine: how many adapters a batch may mix, the largest rank, runtime loading."""

    max_loras: int = Field(default=2, ge=1)
    # Unset: the smallest rank vLLM accepts that holds every listed adapter (16 for one of unknown rank, or none).
    max_rank: int | None = None
    # `llmserve adapters load/unload` on a running stack (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING).
    runtime_updates: bool = True

    @field_validator("max_rank")
    @classmethod
    def _vllm_rank(cls, rank: int | None) -> int | None:
        if rank is not None and rank not in LORA_RANKS:
            raise ValueError(f"vLLM accepts the ranks {', '.join(map(str, LORA_RANKS))}")
        return rank


class Adapter(Strict):
    """A LoRA adapter served beside its base model under a name of its own."""

    name: str = Field(pattern=NAME_PATTERN)
    # A local folder (./ or ../ relative to this file, or absolute) or a Hugging Face id (org/name).
    source: str = Field(min_length=1)
    rank: int | None = Field(default=None, gt=0, le=LORA_RANKS[-1])


class DnsDiscovery(Strict):
    """Engines behind a DNS name (a Kubernetes headless Service), re-resolved at every health check."""

    name: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    scheme: Literal["http", "https"] = "http"


class ModelFile(Strict):
    """One served model: identity, weights, engine settings, gateway policy and (optionally) static endpoints."""

    name: str = Field(pattern=NAME_PATTERN)
    aliases: list[str] = Field(default_factory=list)
    # A bundled model name, a local folder (./ or ../ relative to this file, or absolute), or a Hugging Face id
    # (org/name). Not used with `synthetic`.
    source: str | None = None
    revision: str | None = None
    synthetic: SyntheticWeights | None = None
    engine: EngineSettings
    policy: Policy = Field(default_factory=Policy)
    # Engines that run elsewhere (another host, a Kubernetes Service), for a standalone gateway. `up` ignores
    # them: it starts engine.replicas local engines and routes the gateway to those.
    endpoints: list[HttpUrl] = Field(default_factory=list)
    discovery: DnsDiscovery | None = None
    # Where the gateway finds tokenizer.json (and chat_template.jinja) to count prompt tokens, relative to this
    # file; default: the prepared weights folder when `up` runs the engines, else an estimate from the prompt.
    tokenizer: str | None = None
    # The Ray cluster for vLLM's Ray executor, or `ray.serve` to run the replicas on Ray Serve.
    ray: RaySettings | None = None
    # LoRA on the engine (implied by `adapters`), and the adapters it starts with.
    lora: LoraSettings | None = None
    adapters: list[Adapter] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _ray_serve_health_path(cls, data: Any) -> Any:
        """Ray Serve's OpenAI app has no /health: probe its ingress instead unless the file names a path."""
        if not (isinstance(data, dict) and isinstance(data.get("ray"), dict) and data["ray"].get("serve") is not None):
            return data
        policy = data.get("policy") or {}
        if not isinstance(policy, dict) or not isinstance(policy.get("routing") or {}, dict):
            return data
        routing = {"health_path": RAY_SERVE_HEALTH_PATH, **(policy.get("routing") or {})}
        return {**data, "policy": {**policy, "routing": routing}}

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return safe_name(name)

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, aliases: list[str]) -> list[str]:
        for alias in aliases:
            if not re.match(NAME_PATTERN, alias):
                raise ValueError(f"alias {alias!r} is not a valid model name")
            safe_name(alias)
        return aliases

    @model_validator(mode="after")
    def _consistent(self) -> ModelFile:
        if self.name in self.aliases:
            raise ValueError("an alias repeats the model's own name")
        if (self.source is None) == (self.synthetic is None):
            raise ValueError("give exactly one of source (real weights) and synthetic (random weights)")
        if self.synthetic is not None and self.engine.load_format != "dummy":
            raise ValueError("synthetic weights need engine.load_format: dummy")
        if self.policy.max_tokens_cap >= self.engine.max_model_len:
            raise ValueError("policy.max_tokens_cap must be below engine.max_model_len")
        if self.ray is not None and self.ray.serve is not None:
            self._check_ray_serve(self.ray.serve)
        self._check_adapters()
        return self

    def _check_adapters(self) -> None:
        names = [adapter.name for adapter in self.adapters]
        taken = set(self.names)
        for name in names:
            if name in taken:
                raise ValueError(f"adapter name {name!r} repeats a model or adapter name")
            taken.add(name)
        top = self.lora.max_rank if self.lora is not None else None
        for adapter in self.adapters:
            if top is not None and adapter.rank is not None and adapter.rank > top:
                raise ValueError(f"adapter {adapter.name!r} has rank {adapter.rank}, above lora.max_rank {top}")

    @property
    def lora_enabled(self) -> bool:
        return self.lora is not None or bool(self.adapters)

    @property
    def max_lora_rank(self) -> int:
        """The engine's --max-lora-rank: the file's, else the smallest vLLM rank that holds every adapter."""
        if self.lora is not None and self.lora.max_rank is not None:
            return self.lora.max_rank
        # An adapter of unknown rank may need vLLM's default rank (16).
        need = max((a.rank or LORA_RANKS[2] for a in self.adapters), default=LORA_RANKS[2])
        return next(rank for rank in LORA_RANKS if rank >= need)

    def _check_ray_serve(self, serve: RayServeSettings) -> None:
        if self.endpoints or self.discovery is not None:
            raise ValueError("ray.serve runs the engines: endpoints and discovery do not apply")
        if self.engine.distributed_executor_backend is not None:
            raise ValueError("ray.serve places the engine ranks itself: drop engine.distributed_executor_backend")
        if serve.autoscaling is not None and self.engine.replicas != 1:
            raise ValueError("give engine.replicas or ray.serve.autoscaling, not both")

    @property
    def names(self) -> list[str]:
        return [self.name, *self.aliases]


def is_relative_folder(value: str) -> bool:
    """A source written as a relative path; anything else is a bundled name, a Hugging Face id or absolute."""
    return value in {".", ".."} or value.startswith(("./", "../"))


def resolve_model_paths(data: Data, folder: Path) -> Data:
    """Relative paths of one model file start at its own folder, whichever file extends it and wherever it runs."""
    out = dict(data)
    if isinstance(out.get("tokenizer"), str):
        out["tokenizer"] = str(resolve_path(folder, out["tokenizer"]))
    if isinstance(out.get("source"), str) and is_relative_folder(out["source"]):
        out["source"] = str(resolve_path(folder, out["source"]))
    adapters = out.get("adapters")
    if isinstance(adapters, list):
        out["adapters"] = [
            {**a, "source": str(resolve_path(folder, a["source"]))}
            if isinstance(a, dict) and isinstance(a.get("source"), str) and is_relative_folder(a["source"])
            else a
            for a in adapters
        ]
    synthetic = out.get("synthetic")
    tokenizer_from = synthetic.get("tokenizer_from") if isinstance(synthetic, dict) else None
    if isinstance(synthetic, dict) and isinstance(tokenizer_from, str) and is_relative_folder(tokenizer_from):
        out["synthetic"] = {**synthetic, "tokenizer_from": str(resolve_path(folder, tokenizer_from))}
    return out


def model_file_data(path: Path | str) -> Data:
    """The mapping a model file stands for: the files it extends merged under it, paths made absolute."""
    return merge_layers(read_layers(Path(path), resolve_model_paths))


def load_model_file(path: Path | str) -> ModelFile:
    return load_layered(ModelFile, Path(path), resolve_model_paths)
