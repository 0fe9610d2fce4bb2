"""Keys are stored as digests, found in constant time, revocable; the file is private."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from serve.config.keys import KEY_PREFIX, create_key, digest, find_key, load_keys, revoke_key


def test_digest_is_sha256_hex() -> None:
    assert digest("abc") == hashlib.sha256(b"abc").hexdigest()


def test_create_stores_only_the_digest(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    plain, record = create_key(path, "alice", models=["smollm2"])
    text = path.read_text()
    assert plain.startswith(KEY_PREFIX) and len(plain) > 40
    assert plain not in text
    assert record.sha256 in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = load_keys(path)
    assert find_key(keys, plain) == record
    assert find_key(keys, plain + "x") is None
    assert find_key(keys, "") is None


def test_two_keys_and_revoke(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    a, rec_a = create_key(path, "a")
    b, rec_b = create_key(path, "b")
    assert rec_a.id != rec_b.id
    assert revoke_key(path, rec_a.id)
    assert not revoke_key(path, rec_a.id)
    keys = load_keys(path)
    assert find_key(keys, a) is None
    assert find_key(keys, b) == rec_b


def test_disabled_key_is_not_found(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    plain, _ = create_key(path, "a")
    path.write_text(path.read_text().replace("disabled: false", "disabled: true"))
    assert find_key(load_keys(path), plain) is None


def test_missing_file_means_no_keys(tmp_path: Path) -> None:
    assert load_keys(tmp_path / "none.yaml").keys == []
