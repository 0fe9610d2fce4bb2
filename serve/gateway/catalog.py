"""What a served name stands for: a base model, or a LoRA adapter on one, and where its requests go.

Adapters come from the model files (`adapters:`, loaded by every engine at start) and from `llmserve adapters
load` at runtime. Each is served under its own name, as a model of its own: the base model's file and policy under
the adapter's name (so a key with an allow-list must name the adapter itself, and metrics count it apart) and a
view of the base model's pool that holds only the replicas that loaded it. The view shares the pool's endpoints,
so leases, health and ejection are the pool's. Requests in flight on an adapter are counted, so that an unload can
wait for them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

from serve.config.keys import KeyRecord
from serve.gateway.context import RequestContext
from serve.gateway.errors import NotFound
from serve.gateway.policy import check_access
from serve.gateway.pool import EndpointPool
from serve.gateway.state import GatewayState, ModelState


@dataclass(eq=False)
class AdapterEntry:
    name: str
    # The base model's served name.
    base: str
    source: str
    # The adapter as a model: the base model's file under the adapter's name, and the pool view that holds it.
    model: ModelState
    # Listed in the model file: every engine of the pool starts with it.
    static: bool = False
    inflight: int = 0
    # Being unloaded: new requests get 404, those in flight finish.
    draining: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def holders(self) -> list[str]:
        return [ep.url for ep in self.model.pool.endpoints]

    def hold(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def release(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


def adapter_model(base: ModelState, name: str, holders: set[str] | None) -> ModelState:
    """The base model's state for an adapter; `holders` None means every endpoint of the pool, whatever it holds."""
    model = base.model.model_copy(update={"name": name, "aliases": [], "adapters": []})
    pool = base.pool
    if holders is not None:
        endpoints = [ep for ep in base.pool.endpoints if ep.url in holders]
        pool = EndpointPool(base.pool.model, base.pool.routing, endpoints)
    return dataclasses.replace(base, model=model, pool=pool)


def key_may_use(key: KeyRecord | None, names: list[str]) -> bool:
    return key is None or not key.models or bool(set(key.models) & set(names))


class Catalog:
    """The adapters one gateway serves, beside the models of its state."""

    def __init__(self) -> None:
        self.adapters: dict[str, AdapterEntry] = {}
        self._bound: GatewayState | None = None

    def bind(self, state: GatewayState) -> None:
        """Adapters of the model files, once per lifespan (a new state starts from the files again)."""
        if self._bound is state:
            return
        self._bound = state
        self.adapters = {}
        for entry in {id(e): e for e in state.models.values()}.values():
            for adapter in entry.model.adapters:
                self.adapters[adapter.name] = AdapterEntry(
                    adapter.name, entry.model.name, adapter.source, adapter_model(entry, adapter.name, None), True
                )

    def lookup(self, state: GatewayState, ctx: RequestContext, requested: str) -> ModelState | None:
        """The model a served name, alias or adapter stands for (None: no such model).

        A request on an adapter holds it until the request ends.
        """
        self.bind(state)
        found = state.models.get(requested)
        if found is not None:
            return found
        adapter = self.adapters.get(requested)
        if adapter is None or adapter.draining:
            return None
        adapter.hold()
        ctx.resources.callback(adapter.release)
        return adapter.model

    def resolve(self, state: GatewayState, ctx: RequestContext, requested: str) -> ModelState:
        """`lookup`, with 404 for an unknown name and 403 for a model the key may not use."""
        found = self.lookup(state, ctx, requested)
        if found is None:
            raise NotFound(f"The model {requested!r} does not exist.", param="model", code="model_not_found")
        ctx.model = found.model.name
        check_access(ctx.key, found.model, requested)
        return found

    def served(self, state: GatewayState, name: str) -> ModelState | None:
        """The model behind a served name, without holding it (a stored response's model, say)."""
        self.bind(state)
        found = state.models.get(name)
        if found is not None:
            return found
        adapter = self.adapters.get(name)
        return adapter.model if adapter is not None and not adapter.draining else None

    def cards(self, state: GatewayState, key: KeyRecord | None, created: int) -> list[dict[str, object]]:
        """`/v1/models` entries of the adapters this key may use, each with its base model as `parent`."""
        self.bind(state)
        return [
            {
                "id": a.name,
                "object": "model",
                "created": created,
                "owned_by": "llmserve",
                "root": a.source,
                "parent": a.base,
            }
            for a in self.adapters.values()
            if not a.draining and key_may_use(key, [a.name])
        ]
