"""Keys are stored as digests, found in constant time, revocable, expiring; the file is private; the CLI."""

from __future__ import annotations

import hashlib
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from serve.cli import main
from serve.config.keys import KEY_PREFIX, KeysFile, create_key, digest, find_key, load_keys, revoke_key, save_keys
from serve.config.loader import ConfigError


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


def test_expired_key_is_not_found(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    plain, record = create_key(path, "a", expires=expires)
    keys = load_keys(path)
    assert keys.keys[0].expires == expires
    assert find_key(keys, plain, now=expires - timedelta(seconds=1)) == record
    assert find_key(keys, plain, now=expires) is None
    assert find_key(keys, plain, now=expires + timedelta(days=1)) is None


def test_expiry_without_offset_is_utc(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    plain, _ = create_key(path, "a")
    with path.open("a") as fh:
        fh.write("  expires: 2030-01-01 00:00:00\n")
    record = load_keys(path).keys[0]
    assert record.expires == datetime(2030, 1, 1, tzinfo=UTC)
    assert find_key(load_keys(path), plain, now=datetime(2029, 12, 31, 23, 59, tzinfo=UTC)) == record


def test_limits_round_trip_and_unset_limits_are_not_written(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "limited", rpm=60, tpm=10_000, max_concurrency=4)
    create_key(path, "free")
    text = path.read_text()
    assert "null" not in text
    limited, free = load_keys(path).keys
    assert (limited.rpm, limited.tpm, limited.max_concurrency, limited.expires) == (60, 10_000, 4, None)
    assert (free.rpm, free.tpm, free.max_concurrency, free.expires) == (None, None, None, None)


@pytest.mark.parametrize("field", ["rpm", "tpm", "max_concurrency"])
def test_limits_must_be_positive(tmp_path: Path, field: str) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "a")
    with path.open("a") as fh:
        fh.write(f"  {field}: 0\n")
    with pytest.raises(ConfigError, match=field):
        load_keys(path)


def test_cli_create_with_limits_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.yaml"
    argv = ["keys", "create", "--keys-file", str(path), "--name", "team", "--models", "a,b"]
    argv += ["--rpm", "60", "--tpm", "5000", "--max-concurrency", "2", "--expires", "2099-06-01T12:00:00"]
    assert main(argv) == 0
    plain = capsys.readouterr().out.strip().splitlines()[-1]
    record = find_key(load_keys(path), plain)
    assert record is not None
    assert record.models == ["a", "b"]
    assert (record.rpm, record.tpm, record.max_concurrency) == (60, 5000, 2)
    assert record.expires == datetime(2099, 6, 1, 12, tzinfo=UTC)

    assert main(["keys", "list", "--keys-file", str(path)]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    listed = dict(zip(header.split("\t"), row.split("\t"), strict=True))
    assert plain not in row
    assert listed["id"] == record.id
    assert listed["state"] == "active"
    assert (listed["rpm"], listed["tpm"], listed["concurrency"]) == ("60", "5000", "2")
    assert listed["expires"] == "2099-06-01T12:00:00+00:00"


def test_cli_ttl_days_and_expired_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.yaml"
    before = datetime.now(UTC)
    assert main(["keys", "create", "--keys-file", str(path), "--name", "t", "--ttl-days", "30"]) == 0
    record = load_keys(path).keys[0]
    assert record.expires is not None
    assert (
        before + timedelta(days=30) - timedelta(seconds=1) <= record.expires <= datetime.now(UTC) + timedelta(days=30)
    )
    assert record.rpm is None

    past = record.model_copy(update={"expires": datetime(2001, 1, 1, tzinfo=UTC)})
    save_keys(path, KeysFile(keys=[past]))
    capsys.readouterr()
    assert main(["keys", "list", "--keys-file", str(path)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[1].split("\t")
    assert row[3] == "expired"
    assert row[4:7] == ["-", "-", "-"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--rpm", "0"],
        ["--tpm", "-5"],
        ["--max-concurrency", "x"],
        ["--expires", "2030-01-01", "--ttl-days", "3"],
    ],
)
def test_cli_refuses_bad_limits(tmp_path: Path, extra: list[str]) -> None:
    path = tmp_path / "keys.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["keys", "create", "--keys-file", str(path), "--name", "t", *extra])
    assert exc.value.code == 2
    assert not path.exists()


@pytest.mark.parametrize("value", ["yesterday", "2001-01-01"])
def test_cli_refuses_bad_or_past_expiry(tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.yaml"
    assert main(["keys", "create", "--keys-file", str(path), "--name", "t", "--expires", value]) == 2
    assert "--expires" in capsys.readouterr().err
    assert not path.exists()
