"""Reloading the keys file: on its bytes, whatever its timestamps say; a broken or deleted file keeps the last keys
and says so (last_error, gateway_keys_reload_errors_total); SIGHUP reads it at once; parsing off the event loop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from serve.config.keys import KeyRecord, KeysFile, create_key, digest, save_keys
from serve.config.loader import ConfigError
from serve.gateway import keystore as keystore_module
from serve.gateway.keystore import KeyStore
from serve.gateway.metrics import GatewayMetrics


def one_key(path: Path, plain: str) -> None:
    """A keys file holding one key; files made for different keys have the same size."""
    record = KeyRecord(id="key_samesize", name="n", sha256=digest(plain), created=datetime(2025, 1, 1, tzinfo=UTC))
    save_keys(path, KeysFile(keys=[record]))


def errors(metrics: GatewayMetrics) -> float:
    return metrics.registry.get_sample_value("gateway_keys_reload_errors_total") or 0.0


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    one_key(path, "old")
    return path


@pytest.fixture
def store(path: Path, metrics: GatewayMetrics) -> KeyStore:
    return KeyStore(path, on_reload_error=metrics.keys_reload_errors.inc)


def test_a_changed_file_is_reloaded(path: Path, store: KeyStore) -> None:
    assert store.lookup("old") is not None
    plain, record = create_key(path, "new")
    assert store.reload_if_changed()
    assert store.lookup(plain) == record
    assert store.lookup("old") is not None
    assert not store.reload_if_changed()


def test_a_same_size_copy_with_the_time_kept_is_seen(tmp_path: Path, path: Path, store: KeyStore) -> None:
    before = path.stat()
    swapped = tmp_path / "other.yaml"
    one_key(swapped, "new")
    os.utime(swapped, ns=(before.st_atime_ns, before.st_mtime_ns))
    subprocess.run(["cp", "-p", str(swapped), str(path)], check=True)  # rewrites the file in place
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert store.reload_if_changed()
    assert store.lookup("new") is not None
    assert store.lookup("old") is None


def test_a_same_size_file_renamed_over_with_the_time_kept_is_seen(tmp_path: Path, path: Path, store: KeyStore) -> None:
    before = path.stat()
    staged = tmp_path / ".keys.yaml.partial"  # what rsync -t does: write aside, set the time, rename over
    one_key(staged, "new")
    os.utime(staged, ns=(before.st_atime_ns, before.st_mtime_ns))
    staged.replace(path)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert store.reload_if_changed()
    assert store.lookup("new") is not None
    assert store.lookup("old") is None


def test_a_broken_file_keeps_the_last_keys_and_says_so(path: Path, store: KeyStore, metrics: GatewayMetrics) -> None:
    good = path.read_bytes()
    assert store.last_error is None
    path.write_text("keys: [unclosed\n")
    assert not store.reload_if_changed()
    assert store.lookup("old") is not None
    assert store.last_error is not None
    assert str(path) in store.last_error and "not valid YAML" in store.last_error
    assert errors(metrics) == 1
    assert not store.reload_if_changed(force=True)
    assert errors(metrics) == 1, "one broken version is one error, however often it is read"

    path.write_bytes(good.replace(b"name: n", b"name: ''"))
    assert not store.reload_if_changed()
    assert store.last_error is not None and "keys.0.name" in store.last_error
    assert errors(metrics) == 2

    path.write_bytes(good)  # back to the keys in force
    assert not store.reload_if_changed()
    assert store.last_error is None
    create_key(path, "new")
    assert store.reload_if_changed()
    assert store.last_error is None
    assert errors(metrics) == 2


def test_a_deleted_file_keeps_the_last_keys_and_says_so(path: Path, store: KeyStore, metrics: GatewayMetrics) -> None:
    path.unlink()
    assert not store.reload_if_changed()
    assert store.lookup("old") is not None
    assert store.last_error is not None and "file not found" in store.last_error
    assert not store.reload_if_changed()
    assert errors(metrics) == 1
    one_key(path, "new")
    assert store.reload_if_changed()
    assert store.last_error is None
    assert store.lookup("new") is not None
    assert store.lookup("old") is None


def test_no_file_at_start_is_no_keys_until_one_appears(tmp_path: Path, metrics: GatewayMetrics) -> None:
    path = tmp_path / "keys.yaml"
    store = KeyStore(path, on_reload_error=metrics.keys_reload_errors.inc)
    assert not store.reload_if_changed()
    assert store.last_error is None
    plain, _ = create_key(path, "first")
    assert store.reload_if_changed()
    assert store.lookup(plain) is not None
    assert errors(metrics) == 0


def test_a_broken_file_at_start_is_refused(path: Path) -> None:
    path.write_text("keys: 5\n")
    with pytest.raises(ConfigError, match="keys.yaml"):
        KeyStore(path)


def test_a_settled_unchanged_file_is_only_stat(path: Path, store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keystore_module, "RACY_SECONDS", -1e9)  # as if the file were written long ago
    store.reload_if_changed()
    reads: list[Path] = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or read_bytes(self))
    for _ in range(3):
        assert not store.reload_if_changed()
    assert reads == []
    create_key(path, "new")
    reads.clear()  # the edit read it too
    assert store.reload_if_changed()
    assert reads == [path]


def test_force_reads_the_file_whatever_its_stat_says(
    path: Path, store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keystore_module, "RACY_SECONDS", -1e9)
    monkeypatch.setattr(keystore_module, "signature", lambda st: (0, 0, 0, 0, 0))  # a stat that shows nothing
    store.reload_if_changed(force=True)
    one_key(path, "new")
    assert not store.reload_if_changed()
    assert store.lookup("new") is None
    assert store.reload_if_changed(force=True)
    assert store.lookup("new") is not None


def test_sighup_reloads_at_once(path: Path, store: KeyStore) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        # As the gateway's lifespan installs it.
        loop.add_signal_handler(signal.SIGHUP, store.reload_if_changed, True)
        try:
            one_key(path, "new")
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(100):
                if store.lookup("new") is not None:
                    break
                await asyncio.sleep(0.01)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    asyncio.run(main())
    assert store.lookup("new") is not None
    assert store.lookup("old") is None


def test_the_async_reload_parses_off_the_event_loop(
    path: Path, store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsing, resume = threading.Event(), threading.Event()
    parsed_in: list[threading.Thread] = []
    parse_keys = keystore_module.parse_keys

    def held_parse(raw: bytes, where: Path) -> KeysFile:
        parsed_in.append(threading.current_thread())
        parsing.set()
        assert resume.wait(10)
        return parse_keys(raw, where)

    monkeypatch.setattr(keystore_module, "parse_keys", held_parse)
    one_key(path, "new")

    async def main() -> None:
        reload = asyncio.create_task(store.areload_if_changed())
        for _ in range(1000):  # the loop goes on while the file is parsed
            if parsing.is_set():
                break
            await asyncio.sleep(0.01)
        assert parsing.is_set()
        assert store.lookup("old") is not None
        resume.set()
        assert await reload

    asyncio.run(main())
    assert parsed_in[0] is not threading.main_thread()
    assert store.lookup("new") is not None
