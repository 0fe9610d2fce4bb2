"""Preparing weights: atomic builds, source resolution, synthetic models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve.config.model_file import SyntheticWeights
from serve.models import prepare
from serve.models.prepare import ModelPrepareError, build_atomically, is_complete, prepare_source


def test_interrupted_build_is_never_used(tmp_path: Path) -> None:
    dest = tmp_path / "model"

    def broken(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_atomically(dest, broken)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"], "no partial folder is left behind"

    calls: list[Path] = []
    build_atomically(dest, lambda tmp: calls.append(tmp))
    assert is_complete(dest)
    build_atomically(dest, lambda tmp: calls.append(tmp))
    assert len(calls) == 1, "a complete folder is reused, not rebuilt"


def test_local_folder_is_used_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert prepare_source(str(tmp_path)) == tmp_path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelPrepareError, match="config.json is missing"):
        prepare_source(str(empty))
    with pytest.raises(ModelPrepareError, match="does not exist"):
        prepare_source(str(tmp_path / "missing"))


def test_unknown_reference_says_what_is_accepted() -> None:
    with pytest.raises(ModelPrepareError, match="neither a bundled model"):
        prepare_source("no such thing")


def test_hf_download_failure_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelPrepareError, match="HF_TOKEN") as err:
        prepare_source("meta-llama/Llama-2-13b-chat-hf")
    assert "local folder" in str(err.value)


def test_synthetic_model_has_config_and_tokenizer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "config.json").write_text("{}")
    (tok / "tokenizer.json").write_text('{"t": 1}')
    monkeypatch.setenv("LLMSERVE_CACHE", str(tmp_path / "cache"))
    spec = SyntheticWeights(tokenizer_from=str(tok), config={"model_type": "llama", "num_attention_heads": 8})
    out = prepare.prepare_synthetic("tiny", spec)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_attention_heads"] == 8
    assert (out / "tokenizer.json").read_text() == '{"t": 1}'
    assert prepare.prepare_synthetic("tiny", spec) == out
