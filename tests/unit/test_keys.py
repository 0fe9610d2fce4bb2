"""Keys are stored as digests, found by digest, revocable, expiring; the file is private, edits take turns; the CLI."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from serve.cli import main
from serve.config.keys import (
    KEY_PREFIX,
    KeyIndex,
    KeyRecord,
    KeysFile,
    create_key,
    digest,
    load_keys,
    revoke_key,
    save_keys,
)
from serve.config.loader import ConfigError


def find_key(keys: KeysFile, presented: str, now: datetime | None = None) -> KeyRecord | None:
    return KeyIndex(keys).find(presented, now)


def many_keys(count: int) -> KeysFile:
    created = datetime(2025, 1, 1, tzinfo=UTC)
    return KeysFile(
        keys=[
            KeyRecord(id=f"key_{i:012x}", name=f"k{i}", sha256=digest(f"plain-{i}"), created=created, rpm=60)
            for i in range(count)
        ]
    )


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


def test_index_finds_by_digest_the_last_usable_record(tmp_path: Path) -> None:
    keys = many_keys(10_000)
    index = KeyIndex(keys)
    assert len(index) == 10_000
    assert index.find("plain-9999") == keys.keys[9999]
    assert index.find("plain-10000") is None
    twice = keys.keys[5].model_copy(update={"id": "key_secondrecord", "rpm": 5})
    off = keys.keys[5].model_copy(update={"id": "key_thirdrecord", "disabled": True})
    found = KeyIndex(KeysFile(keys=[*keys.keys, twice, off])).find("plain-5")
    assert found is not None and found.id == "key_secondrecord"


def test_concurrent_creates_and_revokes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    save_keys(path, many_keys(3000))
    revoked = [f"key_{i:012x}" for i in (7, 1500, 2999)]
    created: list[KeyRecord] = []
    answers: list[bool] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2 * len(revoked))

    def run(edit: Callable[[], None]) -> None:
        try:
            start.wait()
            edit()
        except BaseException as exc:  # reported by the assertion below, not lost in the thread
            errors.append(exc)

    edits = [lambda key_id=key_id: answers.append(revoke_key(path, key_id)) for key_id in revoked]
    edits += [lambda: created.append(create_key(path, "new")[1]) for _ in revoked]
    threads = [threading.Thread(target=run, args=(edit,)) for edit in edits]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert answers == [True] * len(revoked)
    ids = [record.id for record in load_keys(path).keys]
    assert len(ids) == 3000
    assert not set(revoked) & set(ids), "a revoked key came back"
    assert {record.id for record in created} <= set(ids), "a new key was lost"
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []


def test_an_edit_makes_an_open_file_private(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    _, record = create_key(path, "a")
    path.chmod(0o644)
    assert not revoke_key(path, "key_notthere")  # nothing to write, and still tightened
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o664)
    old_umask = os.umask(0)
    try:
        create_key(path, "b")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys.yaml.lock").stat().st_mode) == 0o600
    assert [r.id for r in load_keys(path).keys][0] == record.id


def test_a_symlink_planted_as_the_lock_is_not_followed(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    victim = tmp_path / "victim"
    (tmp_path / "keys.yaml.lock").symlink_to(victim)
    with pytest.raises(OSError):
        create_key(path, "a")
    assert not victim.exists()
    assert not path.exists()


def test_cli_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "a")
    create_key(path, "b", expires=datetime.now(UTC) + timedelta(days=1))
    save_keys(path, KeysFile(keys=[*load_keys(path).keys, many_keys(1).keys[0].model_copy(update={"disabled": True})]))
    assert main(["keys", "check", "--keys-file", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: 3 keys, 2 usable"

    path.write_text(path.read_text().replace("rpm: 60", "rpm: -1"))
    assert main(["keys", "check", "--keys-file", str(path)]) != 0
    err = capsys.readouterr().err
    assert str(path) in err and "rpm" in err

    path.write_text("keys: [unclosed\n")
    assert main(["keys", "check", "--keys-file", str(path)]) != 0
    assert "not valid YAML" in capsys.readouterr().err

    assert main(["keys", "check", "--keys-file", str(tmp_path / "none.yaml")]) != 0
    assert "file not found" in capsys.readouterr().err
