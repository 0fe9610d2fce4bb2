"""Tensor parallel 2 on CPU for real: a tiny Llama with random weights split over both cores."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from tests.e2e.conftest import start_stack, stop_and_check

pytestmark = pytest.mark.e2e


def test_tp2_engine_answers_through_the_gateway(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "tp2", "configs/models/tiny-llama-tp2-cpu.yaml")
    try:
        log = next((stack.home / "logs").glob("engine-*.log")).read_text()
        assert "tensor_parallel_size=2" in log
        client = OpenAI(base_url=stack.v1, api_key=stack.key, max_retries=0, timeout=120)
        reply = client.completions.create(
            model="tiny-llama-tp2", prompt="Hello", max_tokens=8, extra_body={"ignore_eos": True}
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 8
        assert reply.choices[0].text
    finally:
        stop_and_check(stack)
