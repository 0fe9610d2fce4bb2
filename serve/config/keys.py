"""The keys file: API keys stored as SHA-256 digests, never in plain text; found by digest, edited under a lock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from serve.config.loader import ConfigError, Strict, format_validation_error

KEY_PREFIX = "sk-llms-"
FILE_MODE = 0o600

# libyaml when PyYAML was built with it: 10,000 keys parse in about a second instead of seven.
_LOADER: Any = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
_DUMPER: Any = yaml.CSafeDumper if yaml.__with_libyaml__ else yaml.SafeDumper


class KeyRecord(Strict):
    id: str = Field(pattern=r"^key_[a-z0-9]{6,32}$")
    name: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: datetime
    # Served names or aliases this key may use; empty means every model.
    models: list[str] = Field(default_factory=list)
    # Limits; absent means unlimited. See serve.gateway.limits for how each is enforced.
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    max_concurrency: int | None = Field(default=None, gt=0)
    expires: datetime | None = None
    disabled: bool = False
    # Who goes first when a model's engines are full: classes in strict order (with an ageing bound for batch),
    # keys of one class by tokens served, in proportion to their weight.
    priority: Literal["interactive", "standard", "batch"] = "standard"
    weight: float = Field(default=1.0, gt=0)

    @field_validator("created", "expires")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        # A hand-written timestamp without an offset is read as UTC, so that it compares with the clock.
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires is not None and (now or datetime.now(UTC)) >= self.expires

    def usable(self, now: datetime | None = None) -> bool:
        return not self.disabled and not self.expired(now)


class KeysFile(Strict):
    keys: list[KeyRecord] = Field(default_factory=list)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyIndex:
    """The records of a keys file by digest: a presented key costs one dict lookup, however many keys there are."""

    def __init__(self, keys: KeysFile) -> None:
        self.keys = keys
        self._by_digest: dict[str, list[KeyRecord]] = {}
        for record in keys.keys:
            self._by_digest.setdefault(record.sha256, []).append(record)

    def __len__(self) -> int:
        return len(self.keys.keys)

    def find(self, presented: str, now: datetime | None = None) -> KeyRecord | None:
        """The usable record (not disabled, not expired) for the presented key; of several, the last in the file."""
        wanted = digest(presented)
        found: KeyRecord | None = None
        for record in self._by_digest.get(wanted, ()):
            # As every comparison with key material here: in constant time, whatever found the candidate.
            if hmac.compare_digest(record.sha256, wanted) and record.usable(now):
                found = record
        return found


def parse_keys(raw: bytes, path: Path) -> KeysFile:
    """A keys file's bytes, validated; the ConfigError names the file and the field."""
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_LOADER)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return KeysFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from exc


def load_keys(path: Path, *, missing_ok: bool = True) -> KeysFile:
    """The keys in the file; with `missing_ok`, no file yet means no keys."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        if missing_ok:
            return KeysFile()
        raise ConfigError(f"{path}: file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_keys(raw, path)


def save_keys(path: Path, keys: KeysFile) -> None:
    """Write atomically with mode 0600: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unset limits are left out rather than written as nulls: the file stays readable by hand.
    text = yaml.dump(keys.model_dump(mode="json", exclude_none=True), Dumper=_DUMPER, sort_keys=False)
    # A name nobody can have prepared: O_EXCL refuses a file already there, O_NOFOLLOW a symlink planted there.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)  # the umask may have taken bits away
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    # The rename itself reaches the disk only with its folder.
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextlib.contextmanager
def editing(path: Path) -> Iterator[KeysFile]:
    """The file's keys, read and written back by the caller while this process holds the file's lock.

    Without it, two `keys` commands at once each write back what they read, and one's change is lost. The lock is
    flock on NAME.lock beside the file, never removed: a lock file deleted while held lets the next one lock another.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(path.stat().st_mode) & ~FILE_MODE:
                os.chmod(path, FILE_MODE)
        yield load_keys(path)
    finally:
        os.close(fd)


def create_key(
    path: Path,
    name: str,
    models: list[str] | None = None,
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrency: int | None = None,
    expires: datetime | None = None,
    priority: Literal["interactive", "standard", "batch"] | None = None,
    weight: float | None = None,
) -> tuple[str, KeyRecord]:
    """Add a new key to the file; returns the plain key (shown once) and its record."""
    plain = generate_key()
    # Unset: the record's own defaults (one place).
    scheduling: dict[str, Any] = {k: v for k, v in (("priority", priority), ("weight", weight)) if v is not None}
    record = KeyRecord(
        id="key_" + secrets.token_hex(6),
        name=name,
        sha256=digest(plain),
        created=datetime.now(UTC).replace(microsecond=0),
        models=list(models or []),
        rpm=rpm,
        tpm=tpm,
        max_concurrency=max_concurrency,
        expires=expires,
        **scheduling,
    )
    with editing(path) as keys:
        save_keys(path, KeysFile(keys=[*keys.keys, record]))
    return plain, record


def revoke_key(path: Path, key_id: str) -> bool:
    with editing(path) as keys:
        remaining = [record for record in keys.keys if record.id != key_id]
        if len(remaining) == len(keys.keys):
            return False
        save_keys(path, KeysFile(keys=remaining))
    return True
