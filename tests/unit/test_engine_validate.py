"""Engine flags checked by vLLM's own parser: a GPU model file is validated on a CPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.cli import main
from serve.config.model_file import ModelFile
from serve.engine.validate import EngineArgsError, check_engine_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs/models").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_model_files_pass_config_check(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok")


def test_unknown_flag_is_reported_by_vllm() -> None:
    model = ModelFile.model_validate(
        {
            "name": "m",
            "source": "a/b",
            "engine": {"max_model_len": 512, "extra_args": ["--no-such-flag"]},
            "policy": {"max_tokens_cap": 10},
        }
    )
    with pytest.raises(EngineArgsError, match="unrecognized arguments: --no-such-flag"):
        check_engine_args(model)


def test_bad_value_is_reported_by_vllm() -> None:
    model = ModelFile.model_validate(
        {
            "name": "m",
            "source": "a/b",
            "engine": {"max_model_len": 512, "extra_args": ["--max-num-seqs", "many"]},
            "policy": {"max_tokens_cap": 10},
        }
    )
    with pytest.raises(EngineArgsError, match="max-num-seqs"):
        check_engine_args(model)


def test_config_check_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: m\nsource: a/b\nengine: {max_model_len: 512, extra_args: ['--nope']}\npolicy: {max_tokens_cap: 10}\n"
    )
    assert main(["config", "check", str(bad)]) == 1
    assert "FAIL" in capsys.readouterr().err
