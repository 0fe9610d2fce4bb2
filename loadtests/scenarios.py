"""Load-test scenarios: seeded request streams with ShareGPT-like or RAG-like prompt and output lengths."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Common English words that SmolLM2's tokenizer (a GPT-2 style BPE, like Llama's) encodes as one token each when
# preceded by a space, so a prompt of n words is close to n tokens. The server's usage gives the exact count.
_WORD_LIST = (
    "the of and to in is was for on that with as by at from his her are this be it an which or had not but were "
    "have their they one all also its been has new more first who other after two time when into can would some "
    "there only most over city may these years between used three such during where world made about part state "
    "well while them many later under both then through since known national like school people work team number "
    "war early around american called united best four being university film long than each life group area "
    "second name high music before government home same five year became game season against small general found "
    "family including different series local million company main public still old"
)
WORDS = tuple(_WORD_LIST.split())

# Tokens a chat template adds around the user's message (SmolLM2's adds a default system prompt: ~30 tokens).
CHAT_TEMPLATE_TOKENS = 40
CHAT_PATH = "/v1/chat/completions"
COMPLETION_PATH = "/v1/completions"


@dataclass(frozen=True)
class LogNormal:
    """Token lengths as a clipped log-normal: `median` and `sigma` of the underlying normal (in log space)."""

    median: float
    sigma: float
    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        value = rng.lognormvariate(math.log(self.median), self.sigma)
        return max(self.low, min(self.high, round(value)))

    @property
    def mean(self) -> float:
        """Mean before clipping."""
        return self.median * math.exp(self.sigma**2 / 2)


# Fitted to ShareGPT conversation statistics as published with vLLM (mean ~160 tokens in, ~340 out, long tails).
SHAREGPT_INPUT = LogNormal(median=95, sigma=1.0, low=4, high=1500)
SHAREGPT_OUTPUT = LogNormal(median=215, sigma=0.9, low=4, high=1024)
# Retrieval-augmented generation: a question over several retrieved passages, a shorter answer.
RAG_INPUT = LogNormal(median=1800, sigma=0.08, low=1200, high=2400)
RAG_OUTPUT = LogNormal(median=100, sigma=0.5, low=16, high=256)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    path: str
    stream: bool
    input_len: LogNormal
    output_len: LogNormal


@dataclass(frozen=True)
class Mix:
    name: str
    description: str
    parts: tuple[tuple[str, float], ...]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "chat", "short chat, streamed (ShareGPT-like lengths)", CHAT_PATH, True, SHAREGPT_INPUT, SHAREGPT_OUTPUT
        ),
        Scenario(
            "chat-nostream",
            "short chat, one JSON answer (ShareGPT-like lengths)",
            CHAT_PATH,
            False,
            SHAREGPT_INPUT,
            SHAREGPT_OUTPUT,
        ),
        Scenario(
            "long-prompt", "RAG-like: ~1.8k tokens in, ~100 out, streamed", CHAT_PATH, True, RAG_INPUT, RAG_OUTPUT
        ),
        Scenario(
            "completion",
            "plain completions, streamed (ShareGPT-like lengths)",
            COMPLETION_PATH,
            True,
            SHAREGPT_INPUT,
            SHAREGPT_OUTPUT,
        ),
        Scenario(
            "completion-nostream",
            "plain completions, one JSON answer (ShareGPT-like lengths)",
            COMPLETION_PATH,
            False,
            SHAREGPT_INPUT,
            SHAREGPT_OUTPUT,
        ),
    )
}
MIXES: dict[str, Mix] = {
    "mix": Mix(
        "mix",
        "50% chat, 15% chat-nostream, 15% long-prompt, 20% completion",
        (("chat", 0.5), ("chat-nostream", 0.15), ("long-prompt", 0.15), ("completion", 0.2)),
    )
}


def scenario_names() -> list[str]:
    return [*SCENARIOS, *MIXES]


@dataclass(frozen=True)
class Lengths:
    """Overrides from the command line: fixed lengths, an output clip, and the model's context window."""

    input_len: int | None = None
    output_len: int | None = None
    max_output_len: int | None = None
    max_model_len: int | None = None
    # A fixed output length spread uniformly over [len * (1 - spread), len * (1 + spread)], the mean kept.
    output_spread: float = 0.0


@dataclass(frozen=True)
class RequestSpec:
    index: int
    scenario: str
    path: str
    stream: bool
    input_len: int
    max_tokens: int
    body: dict[str, Any] = field(hash=False)


def prompt_words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def build_body(
    spec: Scenario,
    model: str,
    index: int,
    input_len: int,
    max_tokens: int,
    rng: random.Random,
    *,
    ignore_eos: bool,
    sampling: dict[str, Any],
) -> dict[str, Any]:
    # The index leads the prompt so no two requests share more than the chat template as a cached prefix.
    text = f"Request {index}. " + prompt_words(rng, max(1, input_len - 4))
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, **sampling}
    if spec.path == CHAT_PATH:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if ignore_eos:
        # Exact output lengths: every target generates the same number of tokens for the same request.
        body["ignore_eos"] = True
    body["stream"] = spec.stream
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def spread_length(length: int, spread: float, draw: random.Random) -> int:
    """A length drawn uniformly from [length * (1 - spread), length * (1 + spread)] (integers, mean `length`).

    Closed-loop users with one fixed output length finish in the same engine step, send again together and stay in
    lockstep: the engine swings between prefilling a whole cohort and decoding it, and tokens/s over a window of a few
    request lifetimes depends on where the window falls. A spread of lengths breaks the cohorts up."""
    width = round(length * spread)
    return max(1, length + draw.randint(-width, width)) if width else length


def fit_lengths(
    spec: Scenario, input_len: int, output_len: int, lengths: Lengths, draw: random.Random | None = None
) -> tuple[int, int]:
    """Apply the overrides, then shrink the prompt so prompt + template + output fit the context window.

    `draw` spreads a fixed output length (`lengths.output_spread`); it is a random source of its own, so a spread
    leaves the prompts of a seed as they are."""
    if lengths.input_len is not None:
        input_len = lengths.input_len
    if lengths.output_len is not None:
        output_len = lengths.output_len
        if draw is not None and lengths.output_spread:
            output_len = spread_length(output_len, lengths.output_spread, draw)
    if lengths.max_output_len is not None:
        output_len = min(output_len, lengths.max_output_len)
    if lengths.max_model_len is not None:
        overhead = CHAT_TEMPLATE_TOKENS if spec.path == CHAT_PATH else 8
        output_len = min(output_len, lengths.max_model_len // 2)
        input_len = min(input_len, lengths.max_model_len - output_len - overhead)
    return max(1, input_len), max(1, output_len)


def generate(
    name: str,
    model: str,
    count: int,
    seed: int = 0,
    lengths: Lengths | None = None,
    *,
    ignore_eos: bool = True,
    sampling: dict[str, Any] | None = None,
) -> list[RequestSpec]:
    """`count` requests of a scenario or mix; the same arguments always give the same requests.

    `sampling` (temperature, top_p, ...) goes into every body as given: the same values must reach every target,
    or a server that fills in its own defaults (a gateway's policy) does different work for the same request.
    Without it the bodies carry none (the load-test config decides them, loadtests/config.py).
    """
    return list(stream(name, model, count, seed, lengths, ignore_eos=ignore_eos, sampling=sampling))


def stream(
    name: str,
    model: str,
    count: int,
    seed: int = 0,
    lengths: Lengths | None = None,
    *,
    ignore_eos: bool = True,
    sampling: dict[str, Any] | None = None,
) -> Iterator[RequestSpec]:
    """The requests of `generate`, made one at a time as they are taken (building thousands of prompts up front
    would eat into the first seconds of a run)."""
    lengths = lengths or Lengths()
    sampling = sampling or {}
    rng = random.Random(f"{seed}:{name}")
    draw = random.Random(f"{seed}:{name}:output-spread")
    if name in MIXES:
        names = [part for part, _ in MIXES[name].parts]
        weights = [weight for _, weight in MIXES[name].parts]
        picks = rng.choices(names, weights=weights, k=count)
    elif name in SCENARIOS:
        picks = [name] * count
    else:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(scenario_names())}")
    for index, pick in enumerate(picks):
        spec = SCENARIOS[pick]
        input_len, output_len = fit_lengths(
            spec, spec.input_len.sample(rng), spec.output_len.sample(rng), lengths, draw
        )
        body = build_body(spec, model, index, input_len, output_len, rng, ignore_eos=ignore_eos, sampling=sampling)
        yield RequestSpec(index, pick, spec.path, spec.stream, input_len, output_len, body)
