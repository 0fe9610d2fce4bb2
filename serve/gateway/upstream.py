"""The engine HTTP client as the proxy sees it: post a body, get a status, read or stream the answer, close."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import httpx


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


class _HttpxResponse:
    __slots__ = ("_resp", "status")

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self.status = resp.status_code

    async def read(self, limit: int | None = None) -> bytes:
        try:
            if limit is None:
                return await self._resp.aread()
            body = bytearray()
            async for chunk in self._resp.aiter_raw():
                body += chunk
                if len(body) >= limit:
                    break
            return bytes(body[:limit])
        except httpx.HTTPError as exc:
            raise EngineBroken(type(exc).__name__) from None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise EngineBroken(type(exc).__name__) from None

    async def aclose(self) -> None:
        await self._resp.aclose()


class HttpxEngineClient:
    """Engine requests over one shared httpx client."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def post(self, url: str, body: bytes, headers: dict[str, str], connect_timeout: float) -> EngineResponse:
        timeout = httpx.Timeout(connect=connect_timeout, read=None, write=connect_timeout, pool=connect_timeout)
        request = self._client.build_request("POST", url, content=body, headers=headers, timeout=timeout)
        try:
            return _HttpxResponse(await self._client.send(request, stream=True))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ConnectFailed(type(exc).__name__) from None
        except httpx.HTTPError as exc:
            raise EngineBroken(type(exc).__name__) from None

    async def aclose(self) -> None:
        await self._client.aclose()
