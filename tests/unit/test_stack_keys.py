"""The secrets `up` keeps in its state folder: the dev API key and the engines' internal key."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from serve.config.keys import digest, load_keys
from serve.stack import engine_key_for, ensure_dev_key


def test_engine_key_is_made_once_private_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMSERVE_ENGINE_KEY", raising=False)
    first = engine_key_for(tmp_path)
    assert len(first) >= 32
    assert stat.S_IMODE((tmp_path / "engine-key").stat().st_mode) == 0o600
    assert engine_key_for(tmp_path) == first
    monkeypatch.setenv("LLMSERVE_ENGINE_KEY", "from-env")
    assert engine_key_for(tmp_path) == "from-env"


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
