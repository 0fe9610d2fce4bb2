"""The engine HTTP client as the proxy sees it: post a body, get a status, read or stream the answer, close.

serve.gateway.engine_client implements it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class ConnectFailed(Exception):
    """The engine could not be reached: it never saw the request, so another endpoint may take it."""


class EngineBroken(Exception):
    """The connection to the engine failed after the request was sent."""


class EngineResponse(Protocol):
    status: int

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; with a limit, at most that many bytes (the rest is not read)."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        ...

    async def aclose(self) -> None:
        """Close the answer; mid-generation this is what makes vLLM abort the request."""
        ...


class EngineClient(Protocol):
    async def post(self, url: str, body: bytes, headers: dict[str, str], connect_timeout: float) -> EngineResponse:
        """Send a POST and wait for the answer's head (callers bound the wait)."""
        ...

    async def aclose(self) -> None: ...
