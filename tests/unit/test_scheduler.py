"""The gateway's queue: room, priority classes, ageing, weighted fair share, bounds, leaving and draining."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from serve.config.keys import KeyRecord
from serve.config.model_file import Routing, Scheduling
from serve.gateway.errors import RateLimited, Unavailable
from serve.gateway.pool import EndpointPool, Lease
from serve.gateway.scheduler import KeyShare, Scheduler


def key(name: str, priority: str = "standard", weight: float = 1.0) -> KeyRecord:
    return KeyRecord.model_validate(
        {
            "id": f"key_{name:0<6}",
            "name": name,
            "sha256": "0" * 64,
            "created": "2026-01-01T00:00:00Z",
            "priority": priority,
            "weight": weight,
        }
    )


def scheduler(target: int = 1, **settings: Any) -> Scheduler:
    pool = EndpointPool.of("m", ("http://e1",), Routing())
    pool.endpoints[0].healthy = True
    return Scheduler(pool, Scheduling(max_running_per_engine=target, **settings), max_num_seqs=None)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_under_the_target_a_lease_comes_at_once() -> None:
    async def body() -> None:
        s = scheduler(target=2)
        a = await s.admit(key("a"), None, 10)
        b = await s.admit(key("a"), None, 10)
        assert s.pool.inflight == 2 and s.queued == 0
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)
        assert s.pool.inflight == 0

    run(body)


async def wait_for(s: Scheduler, queued: int) -> None:
    for _ in range(100):
        if s.queued == queued:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"queue never reached {queued}")


def test_classes_go_in_strict_order_whatever_the_arrival() -> None:
    async def body() -> None:
        s = scheduler()
        running = await s.admit(key("r"), None, 1)
        order: list[str] = []

        async def one(k: KeyRecord) -> None:
            lease = await s.admit(k, None, 1)
            order.append(k.priority)
            lease.__exit__(None, None, None)

        tasks = []
        for k in (key("b", "batch"), key("s", "standard"), key("i", "interactive")):
            tasks.append(asyncio.create_task(one(k)))
            await wait_for(s, len(tasks))
        running.__exit__(None, None, None)
        await asyncio.gather(*tasks)
        assert order == ["interactive", "standard", "batch"]

    run(body)


def test_batch_work_is_served_as_standard_after_the_starvation_bound() -> None:
    async def body() -> None:
        s = scheduler(max_starvation=0.05)
        running = await s.admit(key("r"), None, 1)
        order: list[str] = []

        async def one(k: KeyRecord) -> None:
            lease = await s.admit(k, None, 1)
            order.append(k.name)
            lease.__exit__(None, None, None)

        old_batch = asyncio.create_task(one(key("old", "batch")))
        await wait_for(s, 1)
        await asyncio.sleep(0.1)  # past the bound
        # A standard key that has been served more: the aged batch request (counter 0) goes first.
        s.shares[key("std").id] = KeyShare(counter=50.0)
        newer = asyncio.create_task(one(key("std", "standard")))
        await wait_for(s, 2)
        running.__exit__(None, None, None)
        await asyncio.gather(old_batch, newer)
        assert order == ["old", "std"]

    run(body)


def served_shares(weights: dict[str, float], grants: int) -> dict[str, int]:
    """Two saturating keys of one class: who gets how many of `grants` places (each request: 10 + 10 tokens)."""

    async def body() -> dict[str, int]:
        s = scheduler(output_token_weight=1.0)
        keys = {name: key(name, weight=w) for name, w in weights.items()}
        served = dict.fromkeys(weights, 0)
        done = asyncio.Event()

        async def user(k: KeyRecord) -> None:
            while not done.is_set():
                lease = await s.admit(k, None, 10)
                served[k.name] += 1
                await asyncio.sleep(0)
                s.finished(k, 10)
                lease.__exit__(None, None, None)
                if sum(served.values()) >= grants:
                    done.set()

        users = [asyncio.create_task(user(k)) for k in keys.values() for _ in range(3)]
        await done.wait()
        for u in users:
            u.cancel()
        await asyncio.gather(*users, return_exceptions=True)
        return served

    return asyncio.run(body())


def test_two_keys_of_one_class_and_weight_share_evenly() -> None:
    served = served_shares({"a": 1.0, "b": 1.0}, 400)
    assert abs(served["a"] - served["b"]) <= 0.1 * max(served.values()), served


def test_weight_buys_a_proportional_share() -> None:
    served = served_shares({"a": 2.0, "b": 1.0}, 600)
    assert 1.7 < served["a"] / served["b"] < 2.3, served


def test_an_idle_key_gets_no_credit_for_its_absence() -> None:
    async def body() -> None:
        s = scheduler()
        busy = key("busy")
        s.shares[busy.id] = KeyShare(counter=1000.0, active=1)
        returning = key("back")
        lease = await s.admit(returning, None, 1)
        # It starts at the busy key's counter, not at 0 (which would give it the next ~1,000 tokens alone).
        assert s.shares[returning.id].counter >= 1000.0
        lease.__exit__(None, None, None)

    run(body)


def test_queue_bounds_are_429s_with_retry_after() -> None:
    async def body() -> None:
        s = scheduler(max_queue=1, max_queue_wait=0.1)
        held = await s.admit(key("a"), None, 1)
        waiting = asyncio.create_task(s.admit(key("a"), None, 1))
        await wait_for(s, 1)
        with pytest.raises(RateLimited) as full:
            await s.admit(key("b"), None, 1)
        assert full.value.code == "queue_full" and full.value.headers["retry-after"] == "1"
        with pytest.raises(RateLimited) as late:
            await waiting
        assert late.value.code == "queue_timeout" and late.value.headers["retry-after"] == "1"
        assert s.queued == 0 and s.shares[key("a").id].active == 1
        held.__exit__(None, None, None)
        assert s.pool.inflight == 0

    run(body)


def test_a_request_that_leaves_while_queued_frees_its_place_at_once() -> None:
    async def body() -> None:
        s = scheduler()
        held = await s.admit(key("a"), None, 1)
        waiting = asyncio.create_task(s.admit(key("b"), None, 1))
        await wait_for(s, 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert s.queued == 0 and s.shares[key("b").id].active == 0
        held.__exit__(None, None, None)
        assert s.pool.inflight == 0, "a place was handed to a request that had left"

    run(body)


def test_drain_answers_every_queued_request_at_once() -> None:
    async def body() -> None:
        s = scheduler()
        held = await s.admit(key("a"), None, 1)
        waiting = [asyncio.create_task(s.admit(key("b"), None, 1)) for _ in range(3)]
        await wait_for(s, 3)
        s.refuse_all()
        for task in waiting:
            with pytest.raises(Unavailable, match="shutting down"):
                await task
        assert s.queued == 0
        held.__exit__(None, None, None)

    run(body)


def test_an_engine_that_queues_because_it_is_full_gets_no_more() -> None:
    async def body() -> None:
        s = scheduler(target=10, max_queue_wait=0.05)
        engine = s.pool.endpoints[0]
        # The engine's own load, from its metrics: its batch full (others send to it too) and requests waiting.
        engine.running, engine.waiting = s.engine_batch, 3
        with pytest.raises(RateLimited, match="waited"):
            await s.admit(key("a"), None, 1)
        # Or its KV cache nearly full, with requests waiting.
        engine.running, engine.kv_usage = 5, 0.97
        with pytest.raises(RateLimited, match="waited"):
            await s.admit(key("a"), None, 1)
        engine.waiting = 0
        lease: Lease = await s.admit(key("a"), None, 1)
        lease.__exit__(None, None, None)

    run(body)


def test_requests_waiting_for_the_next_engine_step_do_not_stop_admission() -> None:
    async def body() -> None:
        s = scheduler(target=10, max_queue_wait=0.05)
        engine = s.pool.endpoints[0]
        # Two requests arrived between steps: the engine has room in its batch and its KV cache.
        engine.running, engine.waiting, engine.kv_usage = 6, 2, 0.3
        lease: Lease = await asyncio.wait_for(s.admit(key("a"), None, 1), 1)
        lease.__exit__(None, None, None)

    run(body)


def test_the_interactive_reserve_is_left_free_by_other_classes_and_taken_at_once_by_interactive() -> None:
    async def body() -> None:
        s = scheduler(target=2, interactive_reserve=1)
        a = await s.admit(key("a"), None, 10)
        # A second standard request would take the reserved place: it waits.
        b = asyncio.ensure_future(s.admit(key("b"), None, 10))
        await wait_for(s, 1)
        # An interactive one takes the reserved place at once, with standard work queued.
        i = await asyncio.wait_for(s.admit(key("i", "interactive"), None, 10), 1)
        assert s.pool.inflight == 2 and s.queued == 1
        # The reserved place comes free: it is not handed to the waiting standard request.
        i.__exit__(None, None, None)
        await asyncio.sleep(0)
        assert not b.done() and s.queued == 1 and s.pool.inflight == 1
        # A standard place comes free: it is.
        a.__exit__(None, None, None)
        lease = await asyncio.wait_for(b, 1)
        assert s.queued == 0 and s.pool.inflight == 1
        lease.__exit__(None, None, None)

    run(body)


def test_interactive_requests_queue_behind_each_other_not_behind_the_reserve() -> None:
    async def body() -> None:
        s = scheduler(target=2, interactive_reserve=1)
        held = [await s.admit(key("i", "interactive"), None, 1) for _ in range(2)]
        waiting = asyncio.ensure_future(s.admit(key("j", "interactive"), None, 1))
        await wait_for(s, 1)
        held[0].__exit__(None, None, None)
        lease = await asyncio.wait_for(waiting, 1)
        for one in (lease, held[1]):
            one.__exit__(None, None, None)
        assert s.pool.inflight == 0 and s.queued == 0

    run(body)
