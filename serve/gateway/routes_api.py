"""The rest of vLLM's OpenAI surface through the gateway: embeddings, the Responses API, tokenize, adapters.

Each route runs the generation routes' lifecycle (serve/gateway/forward.py): the body parsed, the model (or
adapter) resolved and access checked, the model's policy applied, an endpoint leased, the key's limits taken and
settled from the engine's usage, everything released when the request ends.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from serve.gateway.adapters_admin import AdapterAdmin
from serve.gateway.api_policy import new_response_id, prepare_embeddings, prepare_responses, prepare_tokenizer_call
from serve.gateway.asgi import JSON, Receive, Scope, Send, header, send_bytes
from serve.gateway.bodies import read_json, requested_model
from serve.gateway.catalog import Catalog
from serve.gateway.context import RequestContext
from serve.gateway.errors import BadRequest, NotFound, Unavailable, UpstreamError, UpstreamTimeout
from serve.gateway.forward import admit, forward, take_lease
from serve.gateway.middleware import authenticate
from serve.gateway.paths import segment
from serve.gateway.policy import check_access
from serve.gateway.pool import EndpointPool, Lease
from serve.gateway.proxy import ERROR_BODY_LIMIT, upstream_error
from serve.gateway.responses_index import RESPONSE_ID, ResponseIndex, StoredResponse
from serve.gateway.state import GatewayState

Handler = Callable[[GatewayState, RequestContext, Scope, Receive, Send], Awaitable[None]]

# Largest stored response relayed from retrieve or cancel.
STORED_RESPONSE_BYTES = 16 * 1024 * 1024


class Pinned(Lease):
    """A lease that a retry never moves: no other engine holds what the request needs."""

    __slots__ = ()

    def move(self) -> bool:
        return False


class PinnedLease:
    """A lease on the one endpoint that holds a stored response: 503 while it is down, 404 once it is gone.

    Taken when entered (into the request's resources), like a pool's lease, and never moved by a retry.
    """

    def __init__(self, pool: EndpointPool, url: str) -> None:
        self.pool = pool
        self.url = url
        self.lease: Lease | None = None

    def __enter__(self) -> Lease:
        for endpoint in self.pool.endpoints:
            if endpoint.url == self.url:
                if not endpoint.healthy:
                    raise Unavailable("the engine holding this response is down", headers={"retry-after": "1"})
                self.lease = Pinned(self.pool, endpoint, None)
                return self.lease
        raise NotFound("the engine that held this response is gone", code="response_not_found")

    def __exit__(self, *exc: object) -> None:
        if self.lease is not None:
            self.lease.endpoint.outstanding -= 1


class Surface:
    """The new routes of one gateway app, with what they remember: adapters and stored responses."""

    def __init__(self) -> None:
        self.catalog = Catalog()
        self.responses = ResponseIndex()
        self.admin = AdapterAdmin(self.catalog)

    def routes(self) -> dict[str, dict[str, Handler]]:
        return {
            "/v1/embeddings": {"POST": self.embeddings},
            "/v1/responses": {"POST": self.create_response},
            "/v1/responses/{id}": {"GET": self.retrieve_response},
            "/v1/responses/{id}/cancel": {"POST": self.cancel_response},
            "/tokenize": {"POST": self.tokenizer_call("/tokenize")},
            "/detokenize": {"POST": self.tokenizer_call("/detokenize")},
            "/admin/adapters": {"GET": self.admin.list, "POST": self.admin.load},
            "/admin/adapters/{name}": {"DELETE": self.admin.unload},
        }

    async def embeddings(
        self, state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        body, off_loop = await self._open(state, scope, receive)
        found = self.catalog.resolve(state, ctx, requested_model(body))
        assert ctx.key is not None
        exact = ctx.key.tpm is not None
        args = (body, found.model, found.counter, exact, ctx.key, state.upstream.engine_key)
        prepared = await asyncio.to_thread(prepare_embeddings, *args) if off_loop else prepare_embeddings(*args)
        await forward(state, ctx, receive, send, found, prepared, "/v1/embeddings")

    async def create_response(
        self, state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        body, off_loop = await self._open(state, scope, receive)
        found = self.catalog.resolve(state, ctx, requested_model(body))
        assert ctx.key is not None
        lease: PinnedLease | None = None
        previous = body.get("previous_response_id")
        if previous is not None:
            # The conversation so far lives in the engine that stored the previous response.
            stored = self._stored(state, ctx, previous, "previous_response_id")
            if stored.model != found.model.name:
                raise BadRequest("previous_response_id belongs to another model", param="previous_response_id")
            lease = PinnedLease(found.pool, stored.endpoint)
        response_id = new_response_id()
        exact = ctx.key.tpm is not None
        args = (body, found.model, found.counter, exact, response_id, ctx.key, state.upstream.engine_key)
        prepared = await asyncio.to_thread(prepare_responses, *args) if off_loop else prepare_responses(*args)
        if body.get("store", True) is not False:
            ctx.resources.callback(self._remember, ctx, response_id)
        await forward(state, ctx, receive, send, found, prepared, "/v1/responses", lease)

    def _remember(self, ctx: RequestContext, response_id: str) -> None:
        """Once the engine answered: the id now routes to the engine that holds it."""
        if ctx.status == 200 and ctx.endpoint is not None and ctx.key is not None:
            self.responses.remember(response_id, ctx.model, ctx.endpoint, ctx.key.id)

    def _stored(
        self, state: GatewayState, ctx: RequestContext, response_id: object, param: str | None = None
    ) -> StoredResponse:
        """The stored response an id names, for a key that may use its model (404 for an id nobody may know)."""
        found = self.responses.find(response_id) if isinstance(response_id, str) else None
        if found is None:
            raise NotFound(f"no stored response {response_id!r}", param=param, code="response_not_found")
        ctx.model = found.model
        served = self.catalog.served(state, found.model)
        if served is None:
            raise NotFound(f"the model {found.model!r} of this response is no longer served", code="model_not_found")
        # Refused as a request for the model itself would be.
        check_access(ctx.key, served.model, found.model)
        return found

    async def retrieve_response(
        self, state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("stream", ["false"])[-1].lower() == "true":
            raise BadRequest("the gateway relays retrieval without stream only", param="stream")
        await self._stored_call(state, ctx, scope, receive, send, "GET", "")

    async def cancel_response(
        self, state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        await self._stored_call(state, ctx, scope, receive, send, "POST", "/cancel")

    async def _stored_call(
        self,
        state: GatewayState,
        ctx: RequestContext,
        scope: Scope,
        receive: Receive,
        send: Send,
        method: str,
        suffix: str,
    ) -> None:
        """Retrieve or cancel on the engine that holds the response. Nothing is generated, so no token is charged
        (the answer's usage is the original request's, counted when it was made)."""
        response_id = segment(scope["path"], 3)
        if not RESPONSE_ID.match(response_id):
            raise NotFound(f"no stored response {response_id!r}", code="response_not_found")
        stored = self._stored(state, ctx, response_id)
        entry = self.catalog.served(state, stored.model)
        assert entry is not None  # checked by _stored, with no await between
        lease = take_lease(state, ctx, PinnedLease(entry.pool, stored.endpoint))
        await admit(state, ctx, 0)
        ctx.prompt_tokens, ctx.completion_tokens = 0, 0
        ctx.endpoint = lease.endpoint.url
        timeouts = entry.model.policy.timeouts
        headers = {"x-request-id": ctx.id}
        if state.upstream.engine_key:
            headers["authorization"] = f"Bearer {state.upstream.engine_key}"
        url = f"{lease.endpoint.url}/v1/responses/{response_id}{suffix}"
        client = await ctx.resources.enter_async_context(
            httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(timeouts.total, connect=timeouts.connect))
        )
        try:
            resp = await client.request(method, url, headers=headers)
        except httpx.TimeoutException:
            raise UpstreamTimeout("the engine did not answer in time") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"engine request failed: {type(exc).__name__}") from None
        if resp.status_code != 200:
            if resp.status_code == 404:
                self.responses.forget(response_id)
            raise upstream_error(resp.status_code, resp.content[:ERROR_BODY_LIMIT])
        if len(resp.content) > STORED_RESPONSE_BYTES:
            raise UpstreamError("the stored response is larger than the gateway relays")
        await send_bytes(ctx, send, 200, resp.content, JSON)

    def tokenizer_call(self, path: str) -> Handler:
        async def handle(state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send) -> None:
            # Outside /v1, so the entry did not authenticate it: the same keys and model access apply.
            ctx.key = authenticate(header(scope, b"authorization"), state.keystore)
            body, _ = await self._open(state, scope, receive)
            found = self.catalog.resolve(state, ctx, requested_model(body))
            prepared = prepare_tokenizer_call(body, found.model, path == "/detokenize")
            await forward(state, ctx, receive, send, found, prepared, path)

        return handle

    async def _open(self, state: GatewayState, scope: Scope, receive: Receive) -> tuple[dict[str, Any], bool]:
        if state.drain.active:
            raise Unavailable("the gateway is shutting down", code="draining", headers={"retry-after": "1"})
        return await read_json(scope, receive, state.max_body_bytes)
