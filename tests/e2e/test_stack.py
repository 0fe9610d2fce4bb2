"""The real stack: vLLM's CPU engine serving SmolLM2 behind the gateway, called with the official OpenAI client."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import httpx
import openai
import psutil
import pytest
from openai import OpenAI

from serve.config.keys import create_key
from tests.e2e.conftest import RunningStack
from tests.metrics_text import metric_sum

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(stack: RunningStack, key: str | None = None) -> OpenAI:
    return OpenAI(base_url=stack.v1, api_key=key or stack.key, max_retries=0, timeout=120)


def test_chat_answers_paris(stack: RunningStack) -> None:
    reply = client(stack).chat.completions.create(model=stack.model, messages=QUESTION, temperature=0, max_tokens=30)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.model == stack.model
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_alias_resolves_to_the_served_model(stack: RunningStack) -> None:
    reply = client(stack).chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=5)
    assert reply.model == stack.model


def test_streamed_chat_with_usage(stack: RunningStack) -> None:
    chunks = list(
        client(stack).chat.completions.create(
            model=stack.model,
            messages=QUESTION,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3, "streamed token by token"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0 and not chunks[-1].choices


def test_stream_without_usage_gets_no_usage_chunk(stack: RunningStack) -> None:
    chunks = list(
        client(stack).chat.completions.create(model=stack.model, messages=QUESTION, max_tokens=8, stream=True)
    )
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_completions(stack: RunningStack) -> None:
    reply = client(stack).completions.create(
        model=stack.model, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert "Paris" in reply.choices[0].text


def test_models_list(stack: RunningStack) -> None:
    assert {m.id for m in client(stack).models.list()} == {stack.model, "smollm2", "default"}


def test_wrong_key_is_401(stack: RunningStack) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        client(stack, "sk-llms-wrong").chat.completions.create(model=stack.model, messages=QUESTION)
    assert err.value.body is not None and err.value.code == "invalid_api_key"


def test_unknown_model_is_404(stack: RunningStack) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(stack).chat.completions.create(model="gpt-4", messages=QUESTION)
    assert err.value.code == "model_not_found"


def test_max_tokens_above_cap_is_400(stack: RunningStack) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(stack).chat.completions.create(model=stack.model, messages=QUESTION, max_tokens=100_000)
    assert err.value.code == "max_tokens_above_cap"


def test_engine_refuses_client_keys(stack: RunningStack) -> None:
    body = {"model": stack.model, "messages": QUESTION, "max_tokens": 2}
    direct = httpx.post(
        f"{stack.engine_url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {stack.key}"}
    )
    assert direct.status_code == 401
    assert stack.engine_url.startswith("http://127.0.0.1:")


def test_disconnect_aborts_generation_in_the_engine(stack: RunningStack) -> None:
    body = {
        "model": stack.model,
        "messages": [{"role": "user", "content": "Count from one to a thousand."}],
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"authorization": f"Bearer {stack.key}"}
    engine_headers = {"authorization": f"Bearer {stack.engine_key}"}
    generated_before = metric_sum(httpx.get(f"{stack.engine_url}/metrics").text, "vllm:generation_tokens_total")
    with httpx.stream("POST", f"{stack.v1}/chat/completions", json=body, headers=headers, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
    # The client is gone after ~5 of 1000 tokens: the engine must stop generating, not finish the request.
    deadline = time.monotonic() + 15
    while True:
        engine = httpx.get(f"{stack.engine_url}/metrics", headers=engine_headers).text
        gateway = httpx.get(f"{stack.url}/metrics").text
        running = metric_sum(engine, "vllm:num_requests_running")
        inflight = metric_sum(gateway, "gateway_inflight_requests")
        if running == 0 and inflight == 0:
            break
        assert time.monotonic() < deadline, f"still running after disconnect: engine={running} gateway={inflight}"
        time.sleep(0.2)
    generated = metric_sum(engine, "vllm:generation_tokens_total") - generated_before
    assert 0 < generated < 1000, f"the engine generated {generated} tokens for a request abandoned after ~5"


def test_gateway_metrics_count_tokens_from_engine_usage(stack: RunningStack) -> None:
    client(stack).chat.completions.create(model=stack.model, messages=QUESTION, max_tokens=4, stream=True)
    text = httpx.get(f"{stack.url}/metrics").text
    assert metric_sum(text, "gateway_completion_tokens_total", model=stack.model) > 0
    assert metric_sum(text, "gateway_prompt_tokens_total", model=stack.model) > 0
    assert metric_sum(text, "gateway_time_to_first_token_seconds_count", model=stack.model) > 0
    assert metric_sum(text, "gateway_inter_token_latency_seconds_count", model=stack.model) > 0
    assert stack.key not in text


def test_prompt_longer_than_the_context_never_reaches_the_engine(stack: RunningStack) -> None:
    # Counted by prompt tokens, not requests: a request of an earlier test may still be finishing in the engine,
    # but none of them had a prompt of 2,000 tokens.
    before = metric_sum(httpx.get(f"{stack.engine_url}/metrics").text, "vllm:prompt_tokens_total")
    prompt = "word " * 2100  # SmolLM2's file allows 2048 tokens of context
    with pytest.raises(openai.BadRequestError) as err:
        client(stack).chat.completions.create(
            model=stack.model, messages=[{"role": "user", "content": prompt}], max_tokens=10
        )
    assert err.value.code == "context_length_exceeded"
    after = httpx.get(f"{stack.engine_url}/metrics").text
    assert metric_sum(after, "vllm:prompt_tokens_total") - before < 2000, "the long prompt reached the engine"


def test_cancelled_streams_release_engine_gateway_and_key_slots(stack: RunningStack) -> None:
    key, _ = create_key(stack.home / "keys.yaml", "two-at-a-time", max_concurrency=2)
    deadline = time.monotonic() + 10
    while httpx.get(f"{stack.v1}/models", headers={"authorization": f"Bearer {key}"}).status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not pick up the new key"
        time.sleep(0.2)
    body = {"model": stack.model, "messages": QUESTION, "max_tokens": 500, "ignore_eos": True, "stream": True}
    headers = {"authorization": f"Bearer {key}"}
    for _ in range(3):  # three rounds of two streams abandoned mid-way: leaked slots would refuse round two
        with (
            httpx.stream("POST", f"{stack.v1}/chat/completions", json=body, headers=headers, timeout=60) as a,
            httpx.stream("POST", f"{stack.v1}/chat/completions", json=body, headers=headers, timeout=60) as b,
        ):
            assert (a.status_code, b.status_code) == (200, 200)
            # Keep the line iterators referenced: a discarded one closes its stream.
            lines = a.iter_lines(), b.iter_lines()
            next(lines[0]), next(lines[1])
            third = httpx.post(
                f"{stack.v1}/chat/completions", json={**body, "stream": False}, headers=headers, timeout=60
            )
            assert third.status_code == 429 and third.json()["error"]["code"] == "concurrency_limit"
        deadline = time.monotonic() + 15
        while True:
            engine = metric_sum(httpx.get(f"{stack.engine_url}/metrics").text, "vllm:num_requests_running")
            gateway = metric_sum(httpx.get(f"{stack.url}/metrics").text, "gateway_inflight_requests")
            if engine == 0 and gateway == 0:
                break
            assert time.monotonic() < deadline, (
                f"after cancelling: engine running={engine}, gateway in flight={gateway}"
            )
            time.sleep(0.2)
    final = httpx.post(f"{stack.v1}/chat/completions", json={**body, "stream": False, "max_tokens": 2}, headers=headers)
    assert final.status_code == 200, "the key's concurrency slots were not all released"


def thread_cpus(process: psutil.Process) -> dict[int, set[int]]:
    """Each thread's allowed CPUs (threads that ended meanwhile are left out)."""
    found: dict[int, set[int]] = {}
    with contextlib.suppress(psutil.Error):
        for thread in process.threads():
            with contextlib.suppress(OSError):
                found[thread.id] = os.sched_getaffinity(thread.id)
    return found


def command_line(process: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return process.cmdline()
    return []


def test_the_gateway_runs_off_the_cores_the_engine_binds_its_threads_to(stack: RunningStack) -> None:
    children = stack.descendants()
    gateway = next(p for p in children if "serve.cli gateway" in " ".join(command_line(p)))
    available = os.sched_getaffinity(stack.proc.pid)
    bound: set[int] = set()
    for process in children:
        if process.pid != gateway.pid:
            for cpus in thread_cpus(process).values():
                if cpus < available:
                    bound |= cpus
    # vLLM's CPU backend binds its model's OpenMP threads to cores of their own whenever it has two or more.
    if len(available) > 1:
        assert bound, f"no engine thread is bound to a core (CPUs {sorted(available)})"
    gateway_threads = thread_cpus(gateway)
    assert gateway_threads
    for tid, cpus in gateway_threads.items():
        if bound and bound != available:
            assert cpus == available - bound, f"gateway thread {tid} on CPUs {sorted(cpus)}; engine threads on {bound}"
        else:
            assert cpus == available, f"gateway thread {tid} pinned to {sorted(cpus)} with no free core"


def test_zz_engine_that_dies_is_restarted_and_readiness_follows(stack: RunningStack) -> None:
    """Runs last in this module: it kills the session engine and waits for `up` to bring it back."""
    engine_pid = next(
        p.pid for p in stack.descendants() if "vllm.entrypoints" in " ".join(p.cmdline()) and p.ppid() == stack.proc.pid
    )
    os.kill(engine_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while httpx.get(f"{stack.url}/readyz").status_code == 200:
        assert time.monotonic() < deadline, "the gateway stayed ready with its only engine dead"
        time.sleep(0.2)
    refused = httpx.post(
        f"{stack.v1}/chat/completions",
        json={"model": stack.model, "messages": QUESTION, "max_tokens": 2},
        headers={"authorization": f"Bearer {stack.key}"},
    )
    assert refused.status_code == 503 and refused.json()["error"]["message"]
    deadline = time.monotonic() + 600
    while httpx.get(f"{stack.url}/readyz").status_code != 200:
        assert stack.proc.poll() is None, "llmserve up exited instead of restarting the engine"
        assert time.monotonic() < deadline, "the engine was not restarted"
        time.sleep(1)
    reply = client(stack).chat.completions.create(model=stack.model, messages=QUESTION, temperature=0, max_tokens=30)
    assert "Paris" in (reply.choices[0].message.content or "")
