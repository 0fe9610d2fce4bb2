"""The gateway's view of the keys file: keys found by digest, reloaded when the file's bytes change, failures shown."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from serve.config.keys import KeyIndex, KeyRecord, KeysFile, parse_keys
from serve.config.loader import ConfigError

log = logging.getLogger(__name__)

# A file changed this soon before it was read may change again within the same timestamp tick, in place and at the
# same size, and its stat would not show it: until it is older than this, each check reads it again.
RACY_SECONDS = 2.0

# What a check compares first: a file replaced (inode), rewritten (ctime, which nobody can set back), resized or
# retouched. Never the content itself: `cp -p` and `rsync -t` keep mtime and, for a same-size swap, the size.
Signature = tuple[int, int, int, int, int]


def signature(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class KeyStore:
    """The keys in force. A broken, unreadable or deleted file keeps the last good keys, and says so: `last_error`,
    and `on_reload_error` called once for each version of the file refused."""

    def __init__(self, path: Path, on_reload_error: Callable[[], None] | None = None) -> None:
        self.path = path
        # Why the keys in force are not what the file holds now; None when they are.
        self.last_error: str | None = None
        self._on_reload_error = on_reload_error
        self._index = KeyIndex(KeysFile())
        self._loaded: str | None = None  # digest of the bytes in force; None before any file was loaded
        self._refused: str | None = None  # what was refused last (a digest, or why the file could not be read)
        self._signature: Signature | None = None
        self._settled = False
        # A SIGHUP may come while the periodic check runs in a worker thread: one check at a time.
        self._checking = threading.Lock()
        try:
            st = path.stat()
            raw = path.read_bytes()
        except FileNotFoundError:
            return  # no keys yet
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        # A broken file at startup raises: the gateway does not start without the keys it was given.
        self._swap(parse_keys(raw, path), hashlib.sha256(raw).hexdigest(), st)

    def lookup(self, presented: str) -> KeyRecord | None:
        return self._index.find(presented)

    async def areload_if_changed(self, force: bool = False) -> bool:
        """`reload_if_changed` in a worker thread: parsing a big file (seconds for 10,000 keys) must not stall the
        event loop. Lookups meanwhile see the old keys or the new ones: the swap is one assignment."""
        return await asyncio.to_thread(self.reload_if_changed, force)

    def reload_if_changed(self, force: bool = False) -> bool:
        """Swap in the file's keys if its bytes changed (`force`: read it whatever its stat says, as on SIGHUP).

        Returns whether new keys are in force.
        """
        with self._checking:
            return self._check(force)

    def _check(self, force: bool) -> bool:
        try:
            st = self.path.stat()
            if not force and self._settled and signature(st) == self._signature:
                return False
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self._signature = None
            if self._loaded is None:
                return False  # there never was a file: still no keys, nothing lost
            return self._refuse("missing", f"{self.path}: file not found")
        except OSError as exc:
            self._signature = None
            return self._refuse("unreadable", f"{self.path}: cannot read: {exc.strerror}")
        content = hashlib.sha256(raw).hexdigest()
        self._remember(st)
        if content == self._loaded:
            self._agree()
            return False
        if content == self._refused:
            return False
        try:
            keys = parse_keys(raw, self.path)
        except ConfigError as exc:
            return self._refuse(content, str(exc))
        self._swap(keys, content, st)
        log.info("keys file reloaded: %d keys", len(keys.keys))
        return True

    def _remember(self, st: os.stat_result) -> None:
        self._signature = signature(st)
        self._settled = time.time() - max(st.st_mtime, st.st_ctime) > RACY_SECONDS

    def _swap(self, keys: KeysFile, content: str, st: os.stat_result) -> None:
        self._index = KeyIndex(keys)
        self._loaded = content
        self._remember(st)
        self._agree()

    def _agree(self) -> None:
        if self.last_error is not None:
            log.info("keys file matches the keys in force again")
        self.last_error = None
        self._refused = None

    def _refuse(self, what: str, message: str) -> bool:
        if what != self._refused:
            self._refused = what
            self.last_error = message
            log.error("keys file refused, keeping the %d keys last loaded: %s", len(self._index), message)
            if self._on_reload_error is not None:
                self._on_reload_error()
        return False
