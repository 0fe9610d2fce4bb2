"""Which engine holds a stored response: response id -> model, endpoint and key id, bounded and expiring.

vLLM keeps a stored response in the memory of the engine that made it, so retrieve and cancel must reach that
engine, with a key that may use the response's model. The index lives in one gateway process: another gateway
replica, or this one after a restart, does not know the id (404).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass

# Ids the gateway gives responses (and accepts in paths): vLLM's "resp_" prefix and 32 hex digits.
RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{32}$")
# Ids remembered at most (the oldest go first), and for how long.
MAX_RESPONSES = 100_000
RESPONSE_TTL_SECONDS = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class StoredResponse:
    model: str
    endpoint: str
    key_id: str
    expires: float


class ResponseIndex:
    def __init__(self, capacity: int = MAX_RESPONSES, ttl: float = RESPONSE_TTL_SECONDS) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def remember(self, response_id: str, model: str, endpoint: str, key_id: str) -> None:
        self._items[response_id] = StoredResponse(model, endpoint, key_id, time.monotonic() + self.ttl)
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        self._expire()

    def find(self, response_id: str) -> StoredResponse | None:
        found = self._items.get(response_id)
        if found is not None and found.expires <= time.monotonic():
            del self._items[response_id]
            return None
        return found

    def forget(self, response_id: str) -> None:
        self._items.pop(response_id, None)

    def _expire(self) -> None:
        """Drop expired ids from the old end: each call does work only for ids that are due."""
        now = time.monotonic()
        while self._items:
            oldest = next(iter(self._items.values()))
            if oldest.expires > now:
                return
            self._items.popitem(last=False)
