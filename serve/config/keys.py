"""The keys file: API keys stored as SHA-256 digests, never in plain text."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

import yaml
from pydantic import Field, field_validator

from serve.config.loader import load_model
from serve.config.model_file import Strict

KEY_PREFIX = "sk-llms-"


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


def find_key(keys: KeysFile, presented: str, now: datetime | None = None) -> KeyRecord | None:
    """Return the usable record whose digest matches (not disabled, not expired), comparing every record."""
    wanted = digest(presented)
    now = now or datetime.now(UTC)
    found: KeyRecord | None = None
    for record in keys.keys:
        if hmac.compare_digest(record.sha256, wanted) and record.usable(now):
            found = record
    return found


def load_keys(path: Path) -> KeysFile:
    if not path.exists():
        return KeysFile()
    return load_model(KeysFile, path, empty_ok=True)


def save_keys(path: Path, keys: KeysFile) -> None:
    """Write atomically with mode 0600: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Unset limits are left out rather than written as nulls: the file stays readable by hand.
    data = keys.model_dump(mode="json", exclude_none=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    os.replace(tmp, path)


def create_key(
    path: Path,
    name: str,
    models: list[str] | None = None,
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrency: int | None = None,
    expires: datetime | None = None,
) -> tuple[str, KeyRecord]:
    """Add a new key to the file; returns the plain key (shown once) and its record."""
    keys = load_keys(path)
    plain = generate_key()
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
    )
    save_keys(path, KeysFile(keys=[*keys.keys, record]))
    return plain, record


def revoke_key(path: Path, key_id: str) -> bool:
    keys = load_keys(path)
    remaining = [record for record in keys.keys if record.id != key_id]
    if len(remaining) == len(keys.keys):
        return False
    save_keys(path, KeysFile(keys=remaining))
    return True
