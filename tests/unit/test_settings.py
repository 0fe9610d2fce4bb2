"""One settings source: LLMSERVE_* variables, the state folder, the gateway file and its relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve.cli import gateway_settings_for, main, parser, stack_for
from serve.config.gateway import GatewayFile, build_settings, load_gateway_file
from serve.config.loader import ConfigError
from serve.config.settings import DEFAULT_MODEL_FILE, environment
from serve.models.prepare import cache_dir

ROOT = Path(__file__).resolve().parents[2]
MODEL = """
name: m
source: org/model
engine: {max_model_len: 2048}
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOME", "CACHE", "MODEL", "HOST", "PORT", "ENGINE_KEY", "REDIS_URL"):
        monkeypatch.delenv(f"LLMSERVE_{name}", raising=False)


def test_defaults_and_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    env = environment()
    assert (env.home, env.model, env.host, env.port, env.engine_key) == (
        Path(".llmserve"),
        DEFAULT_MODEL_FILE,
        None,
        None,
        None,
    )
    assert cache_dir() == tmp_path / "xdg" / "llmserve"
    monkeypatch.setenv("LLMSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMSERVE_PORT", "9001")
    monkeypatch.setenv("LLMSERVE_ENGINE_KEY", "sesame-1234")
    env = environment()
    assert cache_dir() == tmp_path / "cache"
    assert env.state.keys_file == tmp_path / "home" / "keys.yaml"
    assert env.state.runtime_gateway == tmp_path / "home" / "run" / "gateway.yaml"
    assert env.port == 9001
    assert env.engine_key is not None and env.engine_key.get_secret_value() == "sesame-1234"
    assert "sesame-1234" not in repr(env), "secrets are not shown"


def test_a_wrong_variable_is_named_and_a_secret_is_not_shown(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMSERVE_PORT", "eighty")
    monkeypatch.setenv("LLMSERVE_REDIS_URL", "http://user:hunter2@redis")
    with pytest.raises(ConfigError) as err:
        environment()
    assert "LLMSERVE_PORT: Input should be a valid integer" in str(err.value)
    assert "LLMSERVE_REDIS_URL: Value error, expected a redis://" in str(err.value)
    assert "hunter2" not in str(err.value)
    assert main(["keys", "list"]) == 2
    assert "LLMSERVE_PORT" in capsys.readouterr().err


def write_gateway(tmp_path: Path, data: dict[str, object]) -> Path:
    (tmp_path / "conf" / "models").mkdir(parents=True)
    (tmp_path / "conf" / "models" / "m.yaml").write_text(MODEL)
    path = tmp_path / "conf" / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_gateway_file_paths_start_at_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_gateway(
        tmp_path,
        {
            "keys_file": "keys.yaml",
            "models": [{"file": "models/m.yaml", "endpoints": ["http://127.0.0.1:9"], "tokenizer": "../tok"}],
        },
    )
    monkeypatch.chdir(ROOT)
    file = load_gateway_file(path)
    assert file.keys_file == tmp_path / "conf" / "keys.yaml"
    assert file.models[0].file == tmp_path / "conf" / "models" / "m.yaml"
    settings = gateway_settings_for(parser().parse_args(["gateway", "--config", str(path), "--port", "0"]))
    assert settings.file.port == 0
    assert settings.keys_path == tmp_path / "conf" / "keys.yaml"
    (route,) = settings.routes
    assert (route.model.name, route.endpoints, route.tokenizer) == ("m", ("http://127.0.0.1:9",), tmp_path / "tok")


def test_build_settings_resolves_what_is_left_relative_against_base_dir(tmp_path: Path) -> None:
    write_gateway(tmp_path, {})
    file = GatewayFile.model_validate({"models": [{"file": "models/m.yaml", "endpoints": ["http://127.0.0.1:9"]}]})
    settings = build_settings(file, base_dir=tmp_path / "conf", engine_key="e")
    assert settings.routes[0].model.name == "m" and settings.engine_key == "e"


def test_gateway_file_named_on_the_command_line_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        gateway_settings_for(parser().parse_args(["gateway", "--config", str(tmp_path / "typo.yaml")]))
    # Without --config and without configs/gateway.yaml every setting has its default.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMSERVE_HOME", str(tmp_path / "state"))
    settings = gateway_settings_for(parser().parse_args(["gateway"]))
    assert settings.file == GatewayFile()
    assert settings.keys_path == tmp_path / "state" / "keys.yaml"


def test_shipped_gateway_file_sets_nothing_that_is_a_default() -> None:
    assert load_gateway_file(ROOT / "configs" / "gateway.yaml") == GatewayFile()


def test_up_address_flag_over_environment_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_gateway(tmp_path, {"host": "127.0.0.2", "port": 7000})
    model = tmp_path / "conf" / "models" / "m.yaml"
    args = ["up", "--gateway-config", str(path), "--model", str(model)]
    file = stack_for(parser().parse_args(args)).gateway_file
    assert (file.host, file.port) == ("127.0.0.2", 7000)
    monkeypatch.setenv("LLMSERVE_PORT", "7001")
    monkeypatch.setenv("LLMSERVE_HOST", "127.0.0.3")
    file = stack_for(parser().parse_args(args)).gateway_file
    assert (file.host, file.port) == ("127.0.0.3", 7001)
    file = stack_for(parser().parse_args([*args, "--port", "7002"])).gateway_file
    assert (file.host, file.port) == ("127.0.0.3", 7002)


def test_up_takes_the_model_from_the_environment_and_refuses_remote_engines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_gateway(tmp_path, {})
    model = tmp_path / "conf" / "models" / "m.yaml"
    monkeypatch.setenv("LLMSERVE_MODEL", str(model))
    stack = stack_for(parser().parse_args(["up"]))
    assert [(path, m.name) for path, m in stack.models] == [(model, "m")]
    model.write_text(MODEL + "endpoints: [http://10.0.0.5:8000]\n")
    with pytest.raises(ConfigError, match="endpoints and discovery are for `llmserve gateway`"):
        stack_for(parser().parse_args(["up"]))
