"""Seeded scenarios and load shapes of the load tests: same seed, same requests; lengths inside their bounds."""

from __future__ import annotations

import itertools
import statistics

import pytest

from loadtests.scenarios import (
    CHAT_TEMPLATE_TOKENS,
    SHAREGPT_INPUT,
    SHAREGPT_OUTPUT,
    WORDS,
    Lengths,
    generate,
    scenario_names,
)
from loadtests.shapes import arrival_offsets


def test_same_seed_same_requests_other_seed_other_requests() -> None:
    a = generate("mix", "m", 200, seed=7)
    assert a == generate("mix", "m", 200, seed=7)
    assert [s.body for s in a] == [s.body for s in generate("mix", "m", 200, seed=7)]
    assert [s.body for s in a] != [s.body for s in generate("mix", "m", 200, seed=8)]


def test_chat_lengths_follow_a_sharegpt_like_distribution() -> None:
    specs = generate("chat", "m", 4000, seed=1)
    inputs = [s.input_len for s in specs]
    outputs = [s.max_tokens for s in specs]
    assert all(SHAREGPT_INPUT.low <= n <= SHAREGPT_INPUT.high for n in inputs)
    assert all(SHAREGPT_OUTPUT.low <= n <= SHAREGPT_OUTPUT.high for n in outputs)
    # Log-normal: the median sits near the fitted median, the mean well above it (a long tail).
    assert statistics.median(inputs) == pytest.approx(SHAREGPT_INPUT.median, rel=0.1)
    assert statistics.median(outputs) == pytest.approx(SHAREGPT_OUTPUT.median, rel=0.1)
    assert statistics.mean(inputs) > 1.3 * statistics.median(inputs)
    assert len(set(outputs)) > 200


def test_bodies_ask_for_usage_on_streams_and_exact_lengths() -> None:
    for spec in generate("mix", "served", 100, seed=0):
        body = spec.body
        assert body["model"] == "served" and body["max_tokens"] == spec.max_tokens and body["ignore_eos"] is True
        assert body["stream"] is spec.stream
        assert ("stream_options" in body) is spec.stream
        if spec.stream:
            assert body["stream_options"] == {"include_usage": True}
        text = body["messages"][0]["content"] if "messages" in body else body["prompt"]
        words = text.split()
        assert words[:2] == ["Request", f"{spec.index}."]
        assert len(words) == max(1, spec.input_len - 4) + 2
        assert set(words[2:]) <= set(WORDS)
    assert "ignore_eos" not in generate("chat", "m", 1, ignore_eos=False)[0].body


def test_mix_holds_every_part() -> None:
    counts = dict.fromkeys(("chat", "chat-nostream", "long-prompt", "completion"), 0)
    for spec in generate("mix", "m", 2000, seed=3):
        counts[spec.scenario] += 1
    assert counts["chat"] == pytest.approx(1000, rel=0.1)
    assert all(n > 200 for n in counts.values())
    paths = {s.scenario: s.path for s in generate("mix", "m", 200)}
    assert paths["completion"] == "/v1/completions" and paths["chat"] == "/v1/chat/completions"


def test_overrides_and_the_context_window() -> None:
    fixed = generate("chat", "m", 50, lengths=Lengths(input_len=100, output_len=32))
    assert {(s.input_len, s.max_tokens) for s in fixed} == {(100, 32)}
    clipped = generate("chat", "m", 500, lengths=Lengths(max_output_len=64))
    assert max(s.max_tokens for s in clipped) == 64
    long = generate("long-prompt", "m", 200, lengths=Lengths(max_model_len=2048))
    assert all(s.input_len + CHAT_TEMPLATE_TOKENS + s.max_tokens <= 2048 for s in long)
    assert statistics.median(s.input_len for s in long) > 1500


def test_a_spread_output_length_keeps_its_mean_and_the_prompts() -> None:
    exact = generate("chat", "m", 2000, seed=4, lengths=Lengths(output_len=64))
    spread = generate("chat", "m", 2000, seed=4, lengths=Lengths(output_len=64, output_spread=0.5))
    lengths = [s.max_tokens for s in spread]
    assert min(lengths) == 32 and max(lengths) == 96
    assert statistics.mean(lengths) == pytest.approx(64, abs=1.5)
    assert len(set(lengths)) > 50
    # The spread draws from a source of its own: the same seed still sends the same prompts to every target.
    assert [s.body["messages"] for s in spread] == [s.body["messages"] for s in exact]
    assert [s.body["max_tokens"] for s in spread] == lengths
    again = generate("chat", "m", 2000, seed=4, lengths=Lengths(output_len=64, output_spread=0.5))
    assert [s.max_tokens for s in again] == lengths


def test_unknown_scenario_names_the_choices() -> None:
    with pytest.raises(ValueError, match="long-prompt"):
        generate("nope", "m", 1)
    assert {"chat", "chat-nostream", "long-prompt", "completion", "completion-nostream", "mix"} == set(scenario_names())


def test_constant_arrivals_are_evenly_spaced() -> None:
    assert list(itertools.islice(arrival_offsets(4.0, "constant"), 5)) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_poisson_arrivals_are_seeded_with_the_right_mean_gap() -> None:
    offsets = list(itertools.islice(arrival_offsets(5.0, "poisson", seed=2), 5001))
    assert offsets == list(itertools.islice(arrival_offsets(5.0, "poisson", seed=2), 5001))
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert statistics.mean(gaps) == pytest.approx(0.2, rel=0.05)
    # Exponential gaps: the standard deviation equals the mean (constant arrivals would have none).
    assert statistics.stdev(gaps) == pytest.approx(0.2, rel=0.1)
    with pytest.raises(ValueError):
        next(arrival_offsets(0.0, "poisson"))
    with pytest.raises(ValueError):
        next(arrival_offsets(1.0, "closed"))
