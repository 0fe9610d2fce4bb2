"""Prompt token counting with a model's tokenizer and chat template, and the estimate without them."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from serve.config.model_file import ModelFile
from serve.gateway.errors import BadRequest
from serve.gateway.policy import apply_policy
from serve.gateway.tokens import TokenCounter

WORDS = ["<s>", "user", "assistant", ":", "hello", "world", "the", "end", "[UNK]"]
TEMPLATE = (
    "<s> {% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    return tmp_path


def test_chat_is_counted_through_the_template(folder: Path) -> None:
    counter = TokenCounter(folder, prefix_tokens=4)
    info = counter.chat([{"role": "user", "content": "hello world"}])
    # "<s> user : hello world assistant :" -> <s>, user, :, hello, world, assistant, :
    assert info.exact and info.tokens == 7 and info.longest == 7


def test_prefix_key_depends_on_the_first_tokens_only(folder: Path) -> None:
    counter = TokenCounter(folder, prefix_tokens=4)
    a = counter.chat([{"role": "user", "content": "hello world the end"}])
    b = counter.chat([{"role": "user", "content": "hello world world world"}])
    c = counter.chat([{"role": "user", "content": "world hello"}])
    assert a.prefix_key == b.prefix_key != c.prefix_key


def test_completion_prompts(folder: Path) -> None:
    counter = TokenCounter(folder, prefix_tokens=4)
    assert counter.completion("hello world").tokens == 2
    assert counter.completion([1, 2, 3]).tokens == 3
    batch = counter.completion(["hello", "hello world the"])
    assert (batch.tokens, batch.longest) == (4, 3)


def test_without_tokenizer_the_estimate_over_counts(tmp_path: Path) -> None:
    counter = TokenCounter(tmp_path, prefix_tokens=4)
    info = counter.completion("a" * 300)
    assert not info.exact and info.tokens == 100


def test_prompt_longer_than_the_context_is_400(folder: Path) -> None:
    model = ModelFile.model_validate(
        {"name": "m", "source": "a/b", "engine": {"max_model_len": 10}, "policy": {"max_tokens_cap": 5}}
    )
    counter = TokenCounter(folder, prefix_tokens=4)
    ok = apply_policy(
        {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}, model, "chat", counter
    )
    assert ok.prompt_tokens == 6 and ok.reserve_tokens == 10
    with pytest.raises(BadRequest, match="context is 10 tokens: the prompt has 6") as err:
        apply_policy(
            {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}, model, "chat", counter
        )
    assert err.value.code == "context_length_exceeded"


def test_smollm2_template_matches_the_engine_count() -> None:
    """The real converted SmolLM2 folder, when present: vLLM counted 37 tokens for this exact chat."""
    folder = Path.home() / ".cache/llmserve/models/smollm2-135m-instruct"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the bundled model has not been converted on this machine yet (the e2e tests convert it)")
    info = TokenCounter(folder, 16).chat([{"role": "user", "content": "What is the capital of France?"}])
    assert info.exact and info.tokens == 37


def test_a_bound_answers_when_nothing_needs_the_exact_count(folder: Path) -> None:
    counter = TokenCounter(folder, prefix_tokens=4)
    messages = [{"role": "user", "content": "hello world the end"}]
    exact = counter.chat(messages)
    fast = counter.chat(messages, room=1000, exact=False)
    assert fast.upper_bound and not fast.exact and fast.tokens >= exact.tokens
    # Where the bound does not fit the room, the count is exact again (and the context check applies).
    tight = counter.chat(messages, room=exact.tokens, exact=False)
    assert tight.exact and tight.tokens == exact.tokens
    assert counter.completion("hello world", room=1000, exact=False).upper_bound


def test_the_bound_is_never_below_the_real_count() -> None:
    folder = Path.home() / ".cache/llmserve/models/smollm2-135m-instruct"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the bundled model has not been converted on this machine yet (the e2e tests convert it)")
    counter = TokenCounter(folder, 16)
    texts = ["What is the capital of France?", "  spaces   and\n\nnewlines ", "émigré naïve façade", "数字 123 🙂", ""]
    for text in texts:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        bound = counter.chat(messages, room=10_000, exact=False)
        assert bound.upper_bound and bound.tokens >= counter.chat(messages).tokens, text
