"""Model file -> Ray Serve LLM config: the ray section's rules, engine kwargs, replicas and Ray's own schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve.config.loader import ConfigError
from serve.config.model_file import ModelFile, load_model_file
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.pool import EndpointPool, HealthChecker
from serve.ray.serve_config import engine_kwargs, serving_args

ROOT = Path(__file__).resolve().parents[2]
RAY_FILE = ROOT / "configs/models/smollm2-135m-cpu-ray.yaml"
WEIGHTS = "/models/smollm2"


def model(**extra: Any) -> ModelFile:
    data: dict[str, Any] = {
        "name": "m",
        "source": "a/b",
        "engine": {"device": "cpu", "max_model_len": 512},
        "policy": {"max_tokens_cap": 10},
        "ray": {"serve": {}},
    }
    for key, value in extra.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    return ModelFile.model_validate(data)


def test_ray_file_has_the_engine_settings_of_the_local_file() -> None:
    local = load_model_file(ROOT / "configs/models/smollm2-135m-cpu.yaml")
    ray = load_model_file(RAY_FILE)
    assert ray.engine == local.engine
    assert ray.source == local.source and ray.policy.defaults == local.policy.defaults


def test_engine_kwargs_are_the_engine_flags_parsed_by_vllm() -> None:
    ray = load_model_file(RAY_FILE)
    kwargs = engine_kwargs(ray, WEIGHTS)
    assert kwargs == {
        "dtype": ray.engine.dtype,
        "max_model_len": 2048,
        "kv_cache_memory_bytes": 2 * 1024**3,
        "max_num_seqs": 128,
        "enable_prefix_caching": True,
        "generation_config": "vllm",
        "shutdown_timeout": 10,
    }


def test_extra_args_and_parallel_sizes_reach_the_engine_kwargs() -> None:
    m = model(engine={"device": "cuda", "tensor_parallel_size": 4, "extra_args": ["--max-logprobs", "5"]})
    kwargs = engine_kwargs(m, WEIGHTS)
    assert kwargs["tensor_parallel_size"] == 4
    assert kwargs["max_logprobs"] == 5
    # Ray Serve names the model itself, from model_loading_config.
    assert "model" not in kwargs and "served_model_name" not in kwargs


def test_serving_args_of_the_shipped_file() -> None:
    config = serving_args(load_model_file(RAY_FILE), WEIGHTS)["llm_configs"][0]
    assert config["model_loading_config"] == {"model_id": "smollm2-135m-instruct-ray", "model_source": WEIGHTS}
    assert config["accelerator_config"] == {"kind": "cpu"}
    assert config["runtime_env"] == {"env_vars": {"VLLM_USE_AOT_COMPILE": "0"}}
    assert config["deployment_config"]["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 1,
        "target_ongoing_requests": 32,
    }


def test_fixed_replicas_without_autoscaling_and_engine_env_in_runtime_env() -> None:
    m = model(engine={"replicas": 3, "env": {"VLLM_CPU_SGL_KERNEL": "1"}, "cpu_omp_threads_bind": "0|1"})
    config = serving_args(m, WEIGHTS)["llm_configs"][0]
    assert config["deployment_config"] == {"autoscaling_config": {"min_replicas": 3, "max_replicas": 3}}
    assert config["runtime_env"] == {"env_vars": {"VLLM_CPU_SGL_KERNEL": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}}
    gpu = serving_args(model(engine={"device": "cuda"}), WEIGHTS)["llm_configs"][0]
    assert gpu["accelerator_config"] == {"kind": "gpu"}


def test_ray_accepts_the_config() -> None:
    from ray.llm._internal.serve.core.ingress.builder import LLMServingArgs

    args = LLMServingArgs.model_validate(serving_args(load_model_file(RAY_FILE), WEIGHTS))
    (config,) = args.llm_configs
    assert config.accelerator_config is not None and config.accelerator_config.kind == "cpu"
    assert config.engine_kwargs["dtype"] == load_model_file(RAY_FILE).engine.dtype
    assert config.deployment_config["autoscaling_config"]["max_replicas"] == 1


def test_ray_serve_probes_its_ingress_unless_the_file_says_otherwise() -> None:
    assert load_model_file(RAY_FILE).policy.routing.health_path == "/v1/models"
    assert model(policy={"routing": {"health_path": "/-/healthz"}}).policy.routing.health_path == "/-/healthz"
    local = load_model_file(ROOT / "configs/models/smollm2-135m-cpu.yaml")
    assert local.policy.routing.health_path == "/health"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_gateway_probes_the_models_health_path() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200 if request.url.path == "/v1/models" else 404)

    pool = EndpointPool.of("m", ("http://ray",), model().policy.routing)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        checker = HealthChecker([pool], client, 1.0, GatewayMetrics())
        await checker.check_all()
    assert seen == ["/v1/models"]
    assert pool.ready


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"endpoints": ["http://e:8000"]}, "endpoints and discovery do not apply"),
        ({"engine": {"distributed_executor_backend": "ray"}}, "drop engine.distributed_executor_backend"),
        (
            {"engine": {"replicas": 2}, "ray": {"serve": {"autoscaling": {"max_replicas": 2}}}},
            "not both",
        ),
        ({"ray": {"serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}}, "min_replicas is above"),
        ({"ray": {"serve": {"autoscaling": {"min_replicas": 0}}}}, "greater than or equal to 1"),
        ({"ray": {"serve": {"port": 70000}}}, "less than or equal to 65535"),
        ({"ray": {"serve": {"host": "0.0.0.0"}}}, "Extra inputs are not permitted"),
    ],
)
def test_ray_section_mistakes_are_refused(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    data: dict[str, Any] = {
        "name": "m",
        "source": "a/b",
        "engine": {"device": "cpu", "max_model_len": 512, **extra.pop("engine", {})},
        "policy": {"max_tokens_cap": 10},
        "ray": extra.pop("ray", {"serve": {}}),
        **extra,
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message) as err:
        load_model_file(path)
    assert str(path) in str(err.value)
