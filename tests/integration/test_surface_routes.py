"""Embeddings, the Responses API, tokenize and runtime LoRA adapters through the real gateway (stand-in engines)."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from serve.config.keys import create_key
from tests.integration.conftest import ENGINE_KEY, Gateway, gateway_for, model_file
from tests.integration.surface_engine import SurfaceEngine
from tests.metrics_text import metric_sum
from tests.servers import run_server

QUESTION = "What is the capital of France?"
# How the gateway refuses a model a key may not use (serve/gateway/policy.py check_access).
REFUSED = (openai.PermissionDeniedError, openai.NotFoundError)


@dataclass
class Surface:
    gw: Gateway
    engines: list[SurfaceEngine]
    tmp: Path

    def client(self, key: str | None = None) -> OpenAI:
        return OpenAI(base_url=self.gw.v1, api_key=key or self.gw.key, max_retries=0, timeout=30)

    def key(self, models: list[str], **limits: int) -> str:
        plain, _ = create_key(self.gw.keys_path, "other", models, **limits)
        time.sleep(2.5)  # the gateway re-reads the keys file every 2 s
        return plain

    def admin(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        auth = {"authorization": f"Bearer {ENGINE_KEY}"}
        return httpx.request(method, f"{self.gw.url}{path}", headers=auth, timeout=30, **kwargs)  # type: ignore[arg-type]

    def calls(self, path: str) -> list[dict[str, object]]:
        return [body for e in self.engines for _, p, body in e.calls if p == path]


@pytest.fixture
def surface(tmp_path: Path) -> Iterator[Surface]:
    one, two = SurfaceEngine(), SurfaceEngine()
    with run_server(one.app()) as url_one, run_server(two.app()) as url_two:
        models = [
            model_file(tmp_path, "chat-model", [url_one, url_two], ["chat"], lora={"max_rank": 8}),
            model_file(tmp_path, "embed-model", url_one, ["embed"]),
        ]
        with gateway_for(tmp_path, models, one) as gw:
            deadline = time.monotonic() + 10
            while httpx.get(f"{gw.url}/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            yield Surface(gw, [one, two], tmp_path)


def test_embeddings_forward_input_and_options_and_count_usage(surface: Surface) -> None:
    client = surface.client()
    reply = client.embeddings.create(model="embed", input=["a cat", "a dog", "stocks"], dimensions=2)
    assert [d.index for d in reply.data] == [0, 1, 2]
    sent = surface.calls("/v1/embeddings")[-1]
    assert sent["model"] == "embed-model" and sent["input"] == ["a cat", "a dog", "stocks"]
    assert sent["dimensions"] == 2
    # The SDK asks for base64 by default and decodes it; the gateway passes the format through.
    assert sent["encoding_format"] == "base64"
    for given in ("one string", [1, 2, 3], [[1, 2], [3]]):
        client.embeddings.create(model="embed-model", input=given, encoding_format="float")  # type: ignore[arg-type]
        assert surface.calls("/v1/embeddings")[-1]["input"] == given
    text = httpx.get(f"{surface.gw.url}/metrics").text
    assert metric_sum(text, "gateway_prompt_tokens_total", model="embed-model") == 4 * 11
    assert metric_sum(text, "gateway_requests_total", model="embed-model", route="/v1/embeddings") == 4


def test_embeddings_charge_the_engines_usage_to_the_tpm_budget(surface: Surface) -> None:
    key = surface.key(["embed-model"], tpm=1000)
    auth = {"authorization": f"Bearer {key}"}
    body = {"model": "embed-model", "input": "x " * 200, "encoding_format": "float"}
    first = httpx.post(f"{surface.gw.v1}/embeddings", json=body, headers=auth)
    assert first.status_code == 200, first.text
    second = httpx.post(f"{surface.gw.v1}/embeddings", json=body, headers=auth)
    # Each reserves its counted input at admission (the headers show the budget after that); the first was settled
    # at the engine's usage (11 tokens) before the second came.
    before, after = (int(r.headers["x-ratelimit-remaining-tokens"]) for r in (first, second))
    assert before < 1000 - 100
    assert before - 11 <= after <= before - 11 + 3  # + what refilled meanwhile (1000 a minute)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "embed-model"}, "input"),
        ({"model": "embed-model", "input": []}, "input"),
        ({"model": "embed-model", "input": [{"x": 1}]}, "input"),
        ({"model": "embed-model", "input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "embed-model", "input": "a", "dimensions": 0}, "dimensions"),
        ({"model": "embed-model", "messages": [{"role": "user", "content": "a"}]}, "messages"),
    ],
)
def test_bad_embedding_requests_never_reach_the_engine(surface: Surface, body: dict[str, object], param: str) -> None:
    resp = httpx.post(f"{surface.gw.v1}/embeddings", json=body, headers={"authorization": f"Bearer {surface.gw.key}"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert surface.calls("/v1/embeddings") == []


def test_a_key_without_the_model_is_refused_on_every_new_route(surface: Surface) -> None:
    key = surface.key(["chat-model"])
    with pytest.raises(REFUSED):
        surface.client(key).embeddings.create(model="embed-model", input="a")
    auth = {"authorization": f"Bearer {key}"}
    resp = httpx.post(f"{surface.gw.url}/tokenize", json={"model": "embed-model", "prompt": "a"}, headers=auth)
    assert resp.status_code in (403, 404)
    assert surface.calls("/v1/embeddings") == [] and surface.calls("/tokenize") == []


def test_responses_plain_get_the_gateways_id_and_policy(surface: Surface) -> None:
    reply = surface.client().responses.create(model="chat", input=QUESTION)
    assert reply.output_text == "Paris"
    sent = surface.calls("/v1/responses")[-1]
    assert sent["request_id"] == reply.id and str(reply.id).startswith("resp_")
    assert sent["model"] == "chat-model"
    # The model file's defaults, as for chat: max_output_tokens like max_tokens, sampling defaults.
    assert sent["max_output_tokens"] == 16 and sent["temperature"] == 0.3
    with pytest.raises(openai.BadRequestError) as err:
        surface.client().responses.create(model="chat", input=QUESTION, max_output_tokens=101)
    assert err.value.code == "max_tokens_above_cap"


def test_a_client_cannot_choose_the_response_id(surface: Surface) -> None:
    auth = {"authorization": f"Bearer {surface.gw.key}"}
    body = {"model": "chat-model", "input": "hi", "request_id": "resp_" + "0" * 32}
    resp = httpx.post(f"{surface.gw.v1}/responses", json=body, headers=auth)
    assert resp.status_code == 200
    assert resp.json()["id"] != body["request_id"]


def test_streamed_response_times_first_token_and_counts_usage(surface: Surface) -> None:
    stream = surface.client().responses.create(model="chat-model", input=QUESTION, stream=True)
    kinds, text = [], ""
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert text == "Paris" and kinds[-1] == "response.completed"
    metrics = httpx.get(f"{surface.gw.url}/metrics").text
    assert metric_sum(metrics, "gateway_time_to_first_token_seconds_count", model="chat-model") == 1
    assert metric_sum(metrics, "gateway_inter_token_latency_seconds_count", model="chat-model") == 1
    assert metric_sum(metrics, "gateway_completion_tokens_total", model="chat-model") == 3


def test_stored_response_is_retrieved_from_its_engine_with_a_key_that_may_use_the_model(surface: Surface) -> None:
    first, holder = surface.engines
    first.healthy = False
    time.sleep(1.2)  # health checks every 0.5 s: the response is made on the second engine
    made = surface.client().responses.create(model="chat", input=QUESTION)
    assert made.id in holder.stored
    first.healthy = True
    time.sleep(1.2)
    for _ in range(4):  # least-outstanding routing alone would pick the first engine now; the id pins the second
        again = surface.client().responses.retrieve(made.id)
        assert again.id == made.id and again.output_text == "Paris"
    assert holder.paths().count(f"/v1/responses/{made.id}") == 4 and first.calls == []
    cancelled = surface.client().responses.cancel(made.id)
    assert cancelled.status == "cancelled"
    outsider = surface.key(["embed-model"])
    with pytest.raises(REFUSED):
        surface.client(outsider).responses.retrieve(made.id)
    with pytest.raises(REFUSED):
        surface.client(outsider).responses.cancel(made.id)
    with pytest.raises(openai.NotFoundError):
        surface.client().responses.retrieve("resp_" + "f" * 32)
    metrics = httpx.get(f"{surface.gw.url}/metrics").text
    assert metric_sum(metrics, "gateway_requests_total", route="/v1/responses/{id}") == 6
    assert metric_sum(metrics, "gateway_requests_total", route="/v1/responses/{id}/cancel") == 2
    # Retrieval generates nothing: the tokens counted are the creating request's only.
    assert metric_sum(metrics, "gateway_completion_tokens_total", model="chat-model") == 3


def test_previous_response_id_continues_on_the_engine_that_holds_it(surface: Surface) -> None:
    first, holder = surface.engines
    first.healthy = False
    time.sleep(1.2)
    made = surface.client().responses.create(model="chat", input=QUESTION)
    first.healthy = True
    time.sleep(1.2)
    for _ in range(3):
        surface.client().responses.create(model="chat", input="And Spain?", previous_response_id=made.id)
    follow_ups = [b for _, p, b in holder.calls if p == "/v1/responses" and b.get("previous_response_id")]
    assert len(follow_ups) == 3 and not [c for c in first.calls if c[1] == "/v1/responses"]
    with pytest.raises(openai.NotFoundError):
        surface.client().responses.create(model="chat", input="x", previous_response_id="resp_" + "e" * 32)


def test_media_parts_and_hosted_tools_are_refused(surface: Surface) -> None:
    image = {"type": "input_image", "image_url": "http://169.254.169.254/latest/meta-data/"}
    with pytest.raises(openai.BadRequestError):
        surface.client().responses.create(
            model="chat",
            input=[{"role": "user", "content": [image]}],  # type: ignore[list-item]
        )
    with pytest.raises(openai.BadRequestError):
        surface.client().responses.create(
            model="chat", input="hi", tools=[{"type": "mcp", "server_label": "x", "server_url": "http://10.0.0.1"}]
        )
    assert surface.calls("/v1/responses") == []


def test_tokenize_round_trip_needs_a_key_and_spends_no_tokens(surface: Surface) -> None:
    key = surface.key([], tpm=50)
    auth = {"authorization": f"Bearer {key}"}
    assert httpx.post(f"{surface.gw.url}/tokenize", json={"model": "chat", "prompt": "a b"}).status_code == 401
    for _ in range(3):
        tokens = httpx.post(
            f"{surface.gw.url}/tokenize", json={"model": "chat", "prompt": "the cat sat"}, headers=auth
        ).json()
        assert tokens["tokens"] == [3, 3, 3]
        text = httpx.post(f"{surface.gw.url}/detokenize", json={"model": "chat", "tokens": [1, 2]}, headers=auth)
        assert text.json() == {"prompt": "x xx"}
    assert int(text.headers["x-ratelimit-remaining-tokens"]) == 50
    assert surface.calls("/tokenize")[-1]["model"] == "chat-model"
    metrics = httpx.get(f"{surface.gw.url}/metrics").text
    assert metric_sum(metrics, "gateway_requests_total", route="/tokenize", status_class="2xx") == 3
    assert metric_sum(metrics, "gateway_requests_total", route="/tokenize", status_class="4xx") == 1


# vLLM 0.32 routes that stay with the engine: control, profiling, weights, LoRA management, other tasks.
ENGINE_ONLY = [
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("POST", "/collective_rpc"),
    ("POST", "/start_profile"),
    ("POST", "/stop_profile"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/reset_mm_cache"),
    ("POST", "/scale_elastic_ep"),
    ("POST", "/update_weights"),
    ("GET", "/server_info"),
    ("GET", "/load"),
    ("GET", "/version"),
    ("GET", "/health"),
    ("GET", "/ping"),
    ("POST", "/invocations"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/score"),
    ("POST", "/v1/score"),
    ("POST", "/rerank"),
    ("POST", "/v1/rerank"),
    ("POST", "/v2/rerank"),
    ("POST", "/pooling"),
    ("POST", "/classify"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/audio/translations"),
    ("POST", "/v1/messages"),
    ("POST", "/inference/v1/generate"),
    ("GET", "/v1/responses"),
    ("POST", "/v1/responses/x/y"),
    ("POST", "/tokenize/x"),
]


def test_every_other_engine_route_is_unreachable(surface: Surface) -> None:
    auth = {"authorization": f"Bearer {surface.gw.key}"}
    for method, path in ENGINE_ONLY:
        resp = httpx.request(method, f"{surface.gw.url}{path}", json={"model": "chat-model"}, headers=auth)
        assert resp.status_code in (404, 405), f"{method} {path}: {resp.status_code} {resp.text}"
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert not [c for e in surface.engines for c in e.calls], "an engine-only route reached an engine"
    metrics = httpx.get(f"{surface.gw.url}/metrics").text
    # Counted under "other" (never the raw path), except the wrong method on a route the gateway has.
    assert metric_sum(metrics, "gateway_requests_total", route="other") == len(ENGINE_ONLY) - 1


def test_admin_routes_need_the_engine_key(surface: Surface) -> None:
    body = {"name": "sft", "source": "/adapters/sft", "model": "chat-model"}
    assert httpx.post(f"{surface.gw.url}/admin/adapters", json=body).status_code == 401
    wrong = {"authorization": f"Bearer {surface.gw.key}"}
    assert httpx.post(f"{surface.gw.url}/admin/adapters", json=body, headers=wrong).status_code == 401
    assert not surface.calls("/v1/load_lora_adapter")


def test_adapter_loaded_at_runtime_is_served_listed_guarded_then_unloaded(surface: Surface) -> None:
    loaded = surface.admin("POST", "/admin/adapters", json={"name": "sft", "source": "/a/sft", "model": "chat"})
    assert loaded.status_code == 200, loaded.text
    assert sorted(loaded.json()["endpoints"]) == sorted(f"{e}" for e in _urls(surface))
    assert all(e.adapters == {"sft"} for e in surface.engines)
    cards = {m.id: m for m in surface.client().models.list()}
    assert cards["sft"].model_dump()["parent"] == "chat-model"
    reply = surface.client().chat.completions.create(model="sft", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    assert [r["model"] for e in surface.engines for r in e.requests] == ["sft"]
    base_only = surface.key(["chat-model"])
    with pytest.raises(REFUSED):
        surface.client(base_only).chat.completions.create(model="sft", messages=[{"role": "user", "content": "x"}])
    assert "sft" not in {m.id for m in surface.client(base_only).models.list()}
    # Loading a name the base model's files already serve, or for a model without LoRA, is refused.
    taken = surface.admin("POST", "/admin/adapters", json={"name": "chat", "source": "/a", "model": "chat-model"})
    assert taken.status_code == 400
    no_lora = surface.admin("POST", "/admin/adapters", json={"name": "e", "source": "/a", "model": "embed-model"})
    assert no_lora.status_code == 400
    gone = surface.admin("DELETE", "/admin/adapters/sft")
    assert gone.status_code == 200, gone.text
    assert all(e.adapters == set() for e in surface.engines)
    with pytest.raises(openai.NotFoundError):
        surface.client().chat.completions.create(model="sft", messages=[{"role": "user", "content": "x"}])
    assert surface.client().chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])


def test_unload_waits_for_requests_in_flight_on_the_adapter(surface: Surface) -> None:
    assert surface.admin("POST", "/admin/adapters", json={"name": "sft", "source": "/a", "model": "chat"}).is_success
    for engine in surface.engines:
        engine.hold = 1.5
    answers: list[str] = []

    def ask() -> None:
        reply = surface.client().chat.completions.create(model="sft", messages=[{"role": "user", "content": "x"}])
        answers.append(reply.choices[0].message.content or "")

    asking = threading.Thread(target=ask)
    asking.start()
    time.sleep(0.5)
    started = time.monotonic()
    unload = threading.Thread(target=lambda: answers.append(surface.admin("DELETE", "/admin/adapters/sft").text))
    unload.start()
    time.sleep(0.3)
    with pytest.raises(openai.NotFoundError):  # draining: no new requests
        surface.client().chat.completions.create(model="sft", messages=[{"role": "user", "content": "x"}])
    assert all(e.adapters == {"sft"} for e in surface.engines), "unloaded while a request was in flight"
    asking.join()
    unload.join()
    assert answers[0].startswith("tok0") and time.monotonic() - started >= 0.9
    assert all(e.adapters == set() for e in surface.engines)


def test_adapter_requests_go_only_to_replicas_that_hold_it(surface: Surface) -> None:
    one, two = surface.engines
    two.healthy = False
    time.sleep(1.2)  # health checks every 0.5 s: only the first engine is up when the adapter is loaded
    assert surface.admin("POST", "/admin/adapters", json={"name": "sft", "source": "/a", "model": "chat"}).is_success
    two.healthy = True
    time.sleep(1.2)
    for _ in range(4):
        surface.client().chat.completions.create(model="sft", messages=[{"role": "user", "content": "x"}])
    assert [r["model"] for r in one.requests] == ["sft"] * 4 and two.requests == []


def _urls(surface: Surface) -> list[str]:
    return [str(u) for u in surface.admin("GET", "/admin/adapters").json()["data"][0]["endpoints"]]


def test_embedding_base64_passes_through_untouched(surface: Surface) -> None:
    auth = {"authorization": f"Bearer {surface.gw.key}"}
    body = {"model": "embed-model", "input": "a", "encoding_format": "base64"}
    resp = httpx.post(f"{surface.gw.v1}/embeddings", json=body, headers=auth)
    assert resp.status_code == 200 and resp.json()["data"][0]["embedding"] == [0.1, 0.2]
    assert base64  # the stand-in answers floats whatever the format; the real engine's base64 is tested e2e


def test_adapters_of_the_model_file_are_served_on_every_replica(tmp_path: Path) -> None:
    one, two = SurfaceEngine(), SurfaceEngine()
    with run_server(one.app()) as url_one, run_server(two.app()) as url_two:
        adapters = [{"name": "listed-sft", "source": "org/listed-sft", "rank": 8}]
        models = [model_file(tmp_path, "chat-model", [url_one, url_two], [], adapters=adapters)]
        with gateway_for(tmp_path, models, one) as gw:
            while httpx.get(f"{gw.url}/readyz").status_code != 200:
                time.sleep(0.1)
            surface = Surface(gw, [one, two], tmp_path)
            cards = {m.id: m.model_dump() for m in surface.client().models.list()}
            assert cards["listed-sft"]["parent"] == "chat-model" and cards["listed-sft"]["root"] == "org/listed-sft"
            for engine in (one, two):  # the engines hold the adapter's requests a while: they overlap
                engine.adapters, engine.hold = {"listed-sft"}, 0.5
            question = [{"role": "user", "content": "x"}]
            asking = [
                threading.Thread(
                    target=lambda: surface.client().chat.completions.create(model="listed-sft", messages=question)  # type: ignore[arg-type]
                )
                for _ in range(4)
            ]
            for thread in asking:
                thread.start()
                time.sleep(0.05)
            for thread in asking:
                thread.join()
            assert {r["model"] for r in one.requests + two.requests} == {"listed-sft"}
            assert one.requests and two.requests, "a model file's adapter is on every replica"
            one.adapters = two.adapters = set()
            # Not even from the same source: the engines started with it, every replica holds it already.
            body = {"name": "listed-sft", "source": "org/listed-sft", "model": "chat-model"}
            assert surface.admin("POST", "/admin/adapters", json=body).status_code == 400
            assert surface.admin("DELETE", "/admin/adapters/listed-sft").status_code == 400
            assert not surface.calls("/v1/load_lora_adapter") and not surface.calls("/v1/unload_lora_adapter")
