"""The gateway's view of the keys file: looked up in constant time, reloaded when the file changes."""

from __future__ import annotations

import logging
from pathlib import Path

from serve.config.keys import KeyRecord, KeysFile, find_key, load_keys
from serve.config.loader import ConfigError

log = logging.getLogger(__name__)


class KeyStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys = load_keys(path)
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def lookup(self, presented: str) -> KeyRecord | None:
        return find_key(self._keys, presented)

    @property
    def keys(self) -> KeysFile:
        return self._keys

    def reload_if_changed(self, force: bool = False) -> bool:
        """Swap in the file's new contents; a broken file is refused and the last good keys stay in force."""
        stamp = self._file_stamp()
        if stamp == self._stamp and not force:
            return False
        try:
            keys = load_keys(self.path)
        except ConfigError as exc:
            log.error("keys file refused, keeping the previous keys: %s", exc)
            self._stamp = stamp
            return False
        self._keys, self._stamp = keys, stamp
        log.info("keys file reloaded: %d keys", len(keys.keys))
        return True
