"""Property-based fuzzing of the gateway's OpenAPI schema: no input makes it answer 5xx, every /v1 route needs a key."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.integration.conftest import Gateway, gateway_for, model_file
from tests.integration.fake_engine import FakeEngine
from tests.servers import run_server


@pytest.fixture(scope="module")
def fuzzed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("fuzz")
    engine = FakeEngine()
    with run_server(engine.app()) as url:
        models = [model_file(tmp, "m", url, ["alias"])]
        with gateway_for(tmp, models, engine, openapi=True) as gw:
            yield gw


@pytest.fixture(scope="module")
def api_schema(fuzzed_gateway: Gateway) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzzed_gateway.url}/openapi.json")


def test_no_input_makes_the_gateway_fail(api_schema: schemathesis.BaseSchema, fuzzed_gateway: Gateway) -> None:
    auth = {"authorization": f"Bearer {fuzzed_gateway.key}"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case: schemathesis.Case) -> None:
            response = case.call(headers=auth, timeout=30)
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text}"
            if response.status_code >= 400 and case.path.startswith("/v1/"):
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        no_server_error()
    assert fuzzed_gateway.engine.requests, "no generated request was valid enough to reach the engine"


def test_every_v1_route_requires_a_key(fuzzed_gateway: Gateway) -> None:
    spec = httpx.get(f"{fuzzed_gateway.url}/openapi.json").json()
    routes = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops if p.startswith("/v1/")]
    assert {p for _, p in routes} == {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    for method, path in routes:
        resp = httpx.request(method, f"{fuzzed_gateway.url}{path}", json={"model": "m"})
        assert resp.status_code == 401, (method, path)
        assert resp.json()["error"]["code"] == "invalid_api_key"
