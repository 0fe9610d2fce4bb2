"""The secrets `up` keeps in its state folder (the dev API key, the engines' internal key), and the keys file
`up`, `gateway` and `keys` share."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from serve.cli import gateway_settings_for, main, parser, stack_for
from serve.config.keys import digest, load_keys
from serve.config.settings import StateFolder
from serve.engine.process import ChildProcess
from serve.gateway.keystore import KeyStore
from serve.stack import Engine, engine_key_for, ensure_dev_key, write_runtime_config

ROOT = Path(__file__).resolve().parents[2]


def test_engine_key_is_made_once_private_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMSERVE_ENGINE_KEY", raising=False)
    state = StateFolder(tmp_path)
    first = engine_key_for(state)
    assert len(first) >= 32
    assert stat.S_IMODE((tmp_path / "engine-key").stat().st_mode) == 0o600
    assert engine_key_for(state) == first
    monkeypatch.setenv("LLMSERVE_ENGINE_KEY", "from-env")
    assert engine_key_for(state) == "from-env"


def test_dev_key_is_stored_hashed_and_reused(tmp_path: Path) -> None:
    keys, plain_file = tmp_path / "keys.yaml", tmp_path / "dev-key"
    plain = ensure_dev_key(keys, plain_file)
    assert plain_file.read_text().strip() == plain
    assert stat.S_IMODE(plain_file.stat().st_mode) == 0o600
    assert plain not in keys.read_text()
    assert [r.sha256 for r in load_keys(keys).keys] == [digest(plain)]
    assert ensure_dev_key(keys, plain_file) == plain, "a second run reuses the key"
    keys.unlink()  # the keys file was reset: the old plain key no longer works, so a new one is made
    assert ensure_dev_key(keys, plain_file) != plain


def created_key(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["keys", "create", "--name", "alice", *argv]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_a_key_made_by_keys_create_works_with_the_gateway_up_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """LLMSERVE_HOME set, run from the repository (configs/gateway.yaml): `keys create` then `up`."""
    home = tmp_path / "home"
    monkeypatch.setenv("LLMSERVE_HOME", str(home))
    monkeypatch.chdir(ROOT)
    plain = created_key(capsys)
    assert (home / "keys.yaml").is_file()

    stack = stack_for(parser().parse_args(["up"]))
    for _, model in stack.models:
        child = ChildProcess(name="engine", argv=["true"], env={}, log_path=None)
        stack.engines.append(Engine(model=model, url="http://127.0.0.1:9", child=child))
    runtime = write_runtime_config(stack)
    assert runtime == home / "run" / "gateway.yaml"
    # It may hold a Redis URL with a password: the user's only.
    assert runtime.stat().st_mode & 0o777 == 0o600

    # What the gateway child does with it: `llmserve gateway --config <runtime file>`, from another folder.
    monkeypatch.chdir(tmp_path)
    settings = gateway_settings_for(parser().parse_args(["gateway", "--config", str(runtime)]))
    assert settings.keys_path == home / "keys.yaml"
    record = KeyStore(settings.keys_path).lookup(plain)
    assert record is not None and record.name == "alice"
    assert stack.keys_path == settings.keys_path, "up adds its dev key to the same file"


def test_the_gateway_file_names_the_keys_file_relative_to_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMSERVE_HOME", str(tmp_path / "home"))
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "gateway.yaml").write_text("keys_file: secrets/keys.yaml\n")
    plain = created_key(capsys, "--keys-file", str(tmp_path / "conf" / "secrets" / "keys.yaml"))
    monkeypatch.chdir(tmp_path)
    settings = gateway_settings_for(parser().parse_args(["gateway", "--config", "conf/gateway.yaml"]))
    assert settings.keys_path == tmp_path / "conf" / "secrets" / "keys.yaml"
    assert KeyStore(settings.keys_path).lookup(plain) is not None
