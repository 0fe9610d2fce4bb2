"""Reading an engine's load from its Prometheus text at a health check: running, waiting, KV cache use."""

from __future__ import annotations

import asyncio

import httpx

from serve.gateway.metrics import GatewayMetrics
from serve.gateway.pool import EndpointPool, HealthChecker

# As vLLM 0.32 writes them: one series per engine, labelled, with HELP/TYPE lines and look-alike names around.
METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 61.0
vllm:num_requests_running_total{engine="0",model_name="m"} 999.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42
"""


def check(handler: httpx.MockTransport) -> EndpointPool:
    pool = EndpointPool.of("m", ("http://e1:8000",))
    pool.watch_queue = True

    async def body() -> None:
        async with httpx.AsyncClient(transport=handler) as client:
            await HealthChecker([pool], client, 1.0, GatewayMetrics()).check_all()

    asyncio.run(body())
    return pool


def test_the_load_is_read_summed_over_series_and_exact_names_only() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=METRICS if request.url.path == "/metrics" else "")

    engine = check(httpx.MockTransport(answer)).endpoints[0]
    assert engine.healthy
    assert (engine.running, engine.waiting, engine.kv_usage) == (61, 7, 0.42)


def test_metrics_that_cannot_be_read_count_as_no_load() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500 if request.url.path == "/metrics" else 200, text="")

    engine = check(httpx.MockTransport(answer)).endpoints[0]
    assert engine.healthy and (engine.running, engine.waiting, engine.kv_usage) == (0, 0, 0.0)
