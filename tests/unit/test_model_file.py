"""Model files: the shipped ones load; mistakes are refused with the file and field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.config.loader import ConfigError
from serve.config.model_file import load_model_file

ROOT = Path(__file__).resolve().parents[2]
MODELS = sorted((ROOT / "configs" / "models").glob("*.yaml"))

BASE = """
name: m
source: org/model
engine:
  max_model_len: 2048
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


def test_every_shipped_model_file_loads() -> None:
    names = {load_model_file(path).name for path in MODELS}
    assert {"smollm2-135m-instruct", "llama-2-13b-chat", "tiny-llama-tp2"} <= names


def test_llama_2_13b_is_tensor_parallel_fp16_4k() -> None:
    model = load_model_file(ROOT / "configs/models/llama-2-13b-chat.yaml")
    assert (model.engine.device, model.engine.dtype, model.engine.max_model_len) == ("cuda", "float16", 4096)
    assert model.engine.tensor_parallel_size == 2
    assert model.engine.world_size == 2


def test_unknown_field_names_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "  max_model_length: 10\n")
    with pytest.raises(ConfigError) as err:
        load_model_file(path)
    assert str(path) in str(err.value)
    assert "engine.max_model_length" in str(err.value)


def test_reserved_flag_in_extra_args_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "  extra_args: ['--port=9000']\n")
    with pytest.raises(ConfigError, match="--port is set by a typed field"):
        load_model_file(path)


def test_secret_in_engine_env_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "  env: {HF_TOKEN: abc}\n")
    with pytest.raises(ConfigError, match="HF_TOKEN is a secret"):
        load_model_file(path)


def test_synthetic_needs_dummy_weights(tmp_path: Path) -> None:
    text = """
name: t
synthetic: {tokenizer_from: smollm2-135m-instruct, config: {model_type: llama}}
engine: {max_model_len: 512}
policy: {max_tokens_cap: 64}
"""
    with pytest.raises(ConfigError, match="load_format: dummy"):
        load_model_file(write(tmp_path, text))


def test_source_and_synthetic_are_exclusive(tmp_path: Path) -> None:
    text = BASE + "synthetic: {tokenizer_from: x, config: {model_type: llama}}\n"
    with pytest.raises(ConfigError, match="exactly one of source"):
        load_model_file(write(tmp_path, text))


def test_policy_defaults_only_sampling_parameters(tmp_path: Path) -> None:
    text = BASE.replace("2048", "4096") + "policy: {defaults: {temperature: 0.1, model: other}}\n"
    with pytest.raises(ConfigError, match="not sampling parameters: model"):
        load_model_file(write(tmp_path, text))


def test_cap_must_fit_the_context(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_tokens_cap must be below"):
        load_model_file(write(tmp_path, BASE + "policy: {max_tokens_cap: 4096}\n"))


def test_default_above_cap_is_refused(tmp_path: Path) -> None:
    text = BASE + "policy: {max_tokens_cap: 100, default_max_tokens: 200}\n"
    with pytest.raises(ConfigError, match="default_max_tokens is above"):
        load_model_file(write(tmp_path, text))


def test_not_yaml_and_not_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_file(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_model_file(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_model_file(tmp_path / "missing.yaml")
