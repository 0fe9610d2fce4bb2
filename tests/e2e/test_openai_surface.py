"""The rest of the OpenAI surface on real vLLM engines, through the gateway, with the official client.

One stack for the session beside the shared one: `llmserve up` with the LoRA-enabled SmolLM2 and the bundled
all-MiniLM-L6-v2 in one command (two engines), with the engine's Responses store on. An adapter for SmolLM2 is
made with peft in the test's temporary folder (random, non-zero weights) and loaded at runtime.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from openai import OpenAI

from serve.config.keys import create_key
from serve.config.model_file import load_model_file
from tests.e2e.conftest import ROOT, RunningStack, start_stack, stop_and_check
from tests.metrics_text import metric_sum

pytestmark = pytest.mark.e2e

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
# A model the key may not use is refused as the gateway's access check refuses it (serve/gateway/policy.py).
REFUSED = (openai.PermissionDeniedError, openai.NotFoundError)


@dataclass
class Surface:
    stack: RunningStack
    # The prepared weights of each model, as `up` handed them to its gateway.
    weights: dict[str, Path]

    def client(self, key: str | None = None) -> OpenAI:
        return OpenAI(base_url=self.stack.v1, api_key=key or self.stack.key, max_retries=0, timeout=120)

    def key(self, models: list[str], **limits: int) -> str:
        plain, _ = create_key(self.stack.home / "keys.yaml", "e2e", models, **limits)
        time.sleep(2.5)  # the gateway re-reads the keys file every 2 s
        return plain

    def metrics(self) -> str:
        return httpx.get(f"{self.stack.url}/metrics").text

    def adapters(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LLMSERVE_HOME": str(self.stack.home), "LLMSERVE_ENGINE_KEY": self.stack.engine_key}
        command = [sys.executable, "-m", "serve.cli", "adapters", *args]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def surface(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Surface]:
    running = start_stack(
        tmp_path_factory.mktemp("surface"),
        "configs/models/smollm2-135m-lora-cpu.yaml",
        "configs/models/minilm-l6-embed-cpu.yaml",
        # vLLM keeps stored responses only with this (and never frees them): see the README's Responses section.
        extra_env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"},
    )
    runtime = yaml.safe_load((running.home / "run" / "gateway.yaml").read_text())
    weights = {load_model_file(m["file"]).name: Path(m["tokenizer"]) for m in runtime["models"]}
    yield Surface(running, weights)
    stop_and_check(running)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))


def test_similar_sentences_embed_closer_than_unrelated_ones(surface: Surface) -> None:
    client = surface.client()
    sentences = ["The cat sits on the mat", "A cat is sitting on a mat", "Stock markets fell sharply today"]
    vectors = [d.embedding for d in client.embeddings.create(model=EMBED, input=sentences).data]
    cat, kitten, stocks = vectors
    assert len(cat) == 384
    assert cosine(cat, kitten) > cosine(cat, stocks) + 0.3
    assert cosine(cat, kitten) > cosine(kitten, stocks) + 0.3
    # One vector per item, in order: each is the vector of that sentence alone (float and base64 alike).
    for sentence, vector in zip(sentences, vectors, strict=True):
        alone = client.embeddings.create(model="minilm", input=sentence, encoding_format="float").data[0].embedding
        assert cosine(alone, vector) > 0.9999


def test_a_key_without_the_embedding_model_is_refused(surface: Surface) -> None:
    key = surface.key([CHAT])
    with pytest.raises(REFUSED):
        surface.client(key).embeddings.create(model=EMBED, input="hello")


def test_embeddings_charge_the_engines_usage_to_the_tpm_budget(surface: Surface) -> None:
    tpm = 300  # refills 5 tokens a second: small beside what is charged
    key = surface.key([EMBED], tpm=tpm)
    auth = {"authorization": f"Bearer {key}"}
    before = metric_sum(surface.metrics(), "gateway_prompt_tokens_total", model=EMBED)
    # The engine keeps 16 tokens of a longer input: admission reserves the whole input, settlement charges usage.
    body = {"model": EMBED, "input": "the cat sat on the mat " * 10, "truncate_prompt_tokens": 16}
    started = time.monotonic()
    first = httpx.post(f"{surface.stack.v1}/embeddings", json=body, headers=auth, timeout=60)
    used = first.json()["usage"]["prompt_tokens"]
    reserved = tpm - int(first.headers["x-ratelimit-remaining-tokens"])
    assert used == 16 and reserved > 50
    time.sleep(0.5)  # the first request is settled once its answer is sent
    second = httpx.post(f"{surface.stack.v1}/embeddings", json=body, headers=auth, timeout=60)
    refilled = math.ceil(tpm / 60 * (time.monotonic() - started)) + 1
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert tpm - used - reserved <= remaining <= tpm - used - reserved + refilled
    assert refilled < used, "the check could not tell usage from nothing charged"
    after = metric_sum(surface.metrics(), "gateway_prompt_tokens_total", model=EMBED)
    assert after - before == 2 * used


def test_responses_plain_and_streamed_answer_the_capital_question(surface: Surface) -> None:
    client = surface.client()
    question = "What is the capital of France?"
    reply = client.responses.create(model=CHAT, input=question, temperature=0, max_output_tokens=30)
    assert "Paris" in reply.output_text
    assert reply.usage is not None and reply.usage.output_tokens > 0
    ttft_before = metric_sum(surface.metrics(), "gateway_time_to_first_token_seconds_count", model=CHAT)
    text, kinds = "", []
    stream = client.responses.create(model=CHAT, input=question, temperature=0, max_output_tokens=30, stream=True)
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert "Paris" in text and kinds[-1] == "response.completed"
    metrics = surface.metrics()
    assert metric_sum(metrics, "gateway_time_to_first_token_seconds_count", model=CHAT) == ttft_before + 1
    assert metric_sum(metrics, "gateway_requests_total", model=CHAT, route="/v1/responses") >= 2


def test_a_stored_response_is_retrieved_with_its_key_and_refused_without_the_model(surface: Surface) -> None:
    made = surface.client().responses.create(model=CHAT, input="Say hi.", temperature=0, max_output_tokens=8)
    again = surface.client().responses.retrieve(made.id)
    assert again.id == made.id and again.output_text == made.output_text
    outsider = surface.key([EMBED])
    with pytest.raises(REFUSED):
        surface.client(outsider).responses.retrieve(made.id)


def test_tokenize_then_detokenize_round_trips_a_sentence(surface: Surface) -> None:
    sentence = "The quick brown fox jumps over the lazy dog."
    auth = {"authorization": f"Bearer {surface.stack.key}"}
    body = {"model": CHAT, "prompt": sentence, "add_special_tokens": False}
    tokens = httpx.post(f"{surface.stack.url}/tokenize", json=body, headers=auth, timeout=30).json()
    assert tokens["count"] == len(tokens["tokens"]) > 5
    back = httpx.post(
        f"{surface.stack.url}/detokenize", json={"model": CHAT, "tokens": tokens["tokens"]}, headers=auth, timeout=30
    )
    assert back.json()["prompt"] == sentence
    assert httpx.post(f"{surface.stack.url}/tokenize", json=body, timeout=30).status_code == 401


def make_adapter(base: Path, dest: Path) -> Path:
    """A rank-8 LoRA adapter for SmolLM2 with random, non-zero weights (peft's init_lora_weights=False)."""
    script = (
        "import sys, torch\n"
        "from peft import LoraConfig, get_peft_model\n"
        "from transformers import AutoModelForCausalLM\n"
        "torch.manual_seed(0)\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32)\n"
        "config = LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'], init_lora_weights=False)\n"
        "get_peft_model(model, config).save_pretrained(sys.argv[2])\n"
    )
    # In a child: the test process does not keep a copy of the model's weights.
    subprocess.run([sys.executable, "-c", script, str(base), str(dest)], check=True, timeout=600)
    return dest


def greedy(client: OpenAI, model: str) -> str:
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)  # type: ignore[arg-type]
    return reply.choices[0].message.content or ""


def test_an_adapter_loaded_at_runtime_answers_differently_until_unloaded(
    surface: Surface, tmp_path_factory: pytest.TempPathFactory
) -> None:
    adapter = make_adapter(surface.weights[CHAT], tmp_path_factory.mktemp("adapter") / "sea-sft")
    client = surface.client()
    base_answer = greedy(client, CHAT)
    loaded = surface.adapters("load", "sea-sft", str(adapter), "--model", CHAT)
    assert loaded.returncode == 0, loaded.stderr
    assert greedy(client, "sea-sft") != base_answer
    cards = {m.id: m.model_dump() for m in client.models.list()}
    assert cards["sea-sft"]["parent"] == CHAT
    base_only = surface.key([CHAT])
    with pytest.raises(REFUSED):
        greedy(surface.client(base_only), "sea-sft")
    assert "sea-sft" in surface.adapters("list").stdout
    unloaded = surface.adapters("unload", "sea-sft")
    assert unloaded.returncode == 0, unloaded.stderr
    with pytest.raises(openai.NotFoundError):
        greedy(client, "sea-sft")
    assert "sea-sft" not in {m.id for m in client.models.list()}
    assert greedy(client, CHAT) == base_answer
