"""Loading and unloading LoRA adapters on a running gateway's engines: the loopback admin routes.

`llmserve adapters load/unload` call these with the engine key, from the machine the gateway runs on. A load
goes to every healthy replica of the base model (vLLM's /v1/load_lora_adapter), then the gateway serves the name;
an unload first stops new requests (404), waits for those in flight, then unloads it from the engines.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
from typing import Any

from serve.config.model_file import NAME_PATTERN
from serve.gateway.asgi import Receive, Scope, Send, header, send_bytes
from serve.gateway.bodies import read_json
from serve.gateway.catalog import AdapterEntry, Catalog, adapter_model
from serve.gateway.context import RequestContext
from serve.gateway.errors import BadRequest, Forbidden, GatewayError, NotFound, Unauthorized, Unavailable
from serve.gateway.paths import segment
from serve.gateway.proxy import read_error_body, upstream_error
from serve.gateway.state import GatewayState
from serve.gateway.upstream import ConnectFailed, EngineBroken

log = logging.getLogger(__name__)

ADMIN_PREFIX = "/admin/"
# Loading an adapter may download it (a Hugging Face id) before the engine answers.
ENGINE_CALL_SECONDS = 300.0
# The engine's answer when the name is loaded already (a gateway restarted, a load repeated).
ALREADY_LOADED = re.compile(r"has already been loaded")


def check_admin(state: GatewayState, ctx: RequestContext, scope: Scope) -> None:
    """Admin calls come from this machine with the engine key; a gateway without one has no admin routes."""
    engine_key = state.upstream.engine_key
    if engine_key is None:
        raise Forbidden("this gateway has no engine key, so no admin routes", code="admin_disabled")
    try:
        loopback = ctx.client is not None and ipaddress.ip_address(ctx.client).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise Forbidden("admin routes answer on loopback only", code="admin_not_loopback")
    presented = (header(scope, b"authorization") or b"").decode("latin-1").partition(" ")[2].strip()
    if not hmac.compare_digest(presented.encode(), engine_key.encode()):
        raise Unauthorized("admin routes take the engine key", headers={"www-authenticate": "Bearer"})


async def engine_call(state: GatewayState, url: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"}
    if state.upstream.engine_key:
        headers["authorization"] = f"Bearer {state.upstream.engine_key}"
    try:
        async with asyncio.timeout(ENGINE_CALL_SECONDS):
            resp = await state.upstream.client.post(url + path, json.dumps(body).encode(), headers, 10.0)
            try:
                return resp.status, await read_error_body(resp)
            finally:
                await resp.aclose()
    except (ConnectFailed, EngineBroken, TimeoutError) as exc:
        raise Unavailable(f"engine {url} did not answer the adapter call ({type(exc).__name__})") from None


def adapter_view(adapter: AdapterEntry) -> dict[str, Any]:
    return {
        "name": adapter.name,
        "model": adapter.base,
        "source": adapter.source,
        "static": adapter.static,
        "endpoints": sorted(adapter.holders),
        "inflight": adapter.inflight,
    }


class AdapterAdmin:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    async def list(self, state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send) -> None:
        check_admin(state, ctx, scope)
        self.catalog.bind(state)
        data = [adapter_view(a) for a in self.catalog.adapters.values()]
        await send_bytes(ctx, send, 200, json.dumps({"object": "list", "data": data}).encode())

    async def load(self, state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send) -> None:
        check_admin(state, ctx, scope)
        self.catalog.bind(state)
        body, _ = await read_json(scope, receive, state.max_body_bytes)
        name, source, base = (body.get(k) for k in ("name", "source", "model"))
        if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
            raise BadRequest("name must be a valid model name", param="name")
        if not isinstance(source, str) or not source:
            raise BadRequest("source must be a folder on the engines' machine or a Hugging Face id", param="source")
        entry = state.models.get(base) if isinstance(base, str) else None
        if entry is None:
            raise NotFound(f"no base model {base!r}", param="model", code="model_not_found")
        if not entry.model.lora_enabled:
            raise BadRequest(
                f"model {entry.model.name!r} runs without LoRA: add `lora:` to its model file", param="model"
            )
        known = self.catalog.adapters.get(name)
        if known is not None and known.static:
            raise BadRequest(f"adapter {name!r} is listed in its model file: every engine has it", param="name")
        if name in state.models or (known is not None and (known.base, known.source) != (entry.model.name, source)):
            raise BadRequest(f"the name {name!r} is already served", param="name", code="name_taken")
        endpoints = [ep.url for ep in entry.pool.endpoints if ep.healthy]
        if not endpoints:
            raise Unavailable(f"no healthy engine of {entry.model.name!r} to load the adapter on")
        loaded: list[str] = []
        try:
            for url in endpoints:
                status, answer = await engine_call(
                    state, url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": source}
                )
                if status != 200 and not (status == 400 and ALREADY_LOADED.search(answer.decode(errors="replace"))):
                    raise (
                        upstream_error(status, answer)
                        if status != 404
                        else BadRequest(
                            f"engine {url} does not load adapters at runtime (lora.runtime_updates in the model file)"
                        )
                    )
                loaded.append(url)
        except GatewayError:
            # All replicas or none: an adapter some replicas lack would fail the requests routed there.
            for url in loaded:
                await self._unload_quietly(state, url, name)
            raise
        holders = set(loaded) | set(known.holders if known is not None else ())
        adapter = AdapterEntry(name, entry.model.name, source, adapter_model(entry, name, holders))
        if known is not None:
            # Requests in flight hold the entry they resolved: the new one takes over its count.
            known.model = adapter.model
            adapter = known
        self.catalog.adapters[name] = adapter
        log.info("adapter %s of %s loaded on %d engine(s)", name, entry.model.name, len(loaded))
        await send_bytes(ctx, send, 200, json.dumps(adapter_view(adapter)).encode())

    async def unload(
        self, state: GatewayState, ctx: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        check_admin(state, ctx, scope)
        self.catalog.bind(state)
        name = segment(scope["path"], 3)
        adapter = self.catalog.adapters.get(name)
        if adapter is None:
            raise NotFound(f"no adapter {name!r}", code="model_not_found")
        if adapter.static:
            raise BadRequest(f"adapter {name!r} is listed in its model file: remove it there", code="static_adapter")
        adapter.draining = True
        entry = state.models.get(adapter.base)
        # No request outlives its model's total timeout, so the wait is bounded.
        limit = entry.model.policy.timeouts.total if entry is not None else 0.0
        try:
            async with asyncio.timeout(limit + 5.0):
                await adapter.idle.wait()
        except TimeoutError:
            log.warning("adapter %s still had %d request(s) in flight; unloading it", name, adapter.inflight)
        for url in sorted(adapter.holders):
            await self._unload_quietly(state, url, name)
        self.catalog.adapters.pop(name, None)
        log.info("adapter %s of %s unloaded", name, adapter.base)
        await send_bytes(ctx, send, 200, json.dumps({**adapter_view(adapter), "endpoints": []}).encode())

    async def _unload_quietly(self, state: GatewayState, url: str, name: str) -> None:
        try:
            status, answer = await engine_call(state, url, "/v1/unload_lora_adapter", {"lora_name": name})
        except Unavailable as exc:
            log.warning("unloading adapter %s from %s: %s", name, url, exc.message)
            return
        if status not in (200, 404):
            log.warning("unloading adapter %s from %s: HTTP %d %s", name, url, status, answer[:200])
