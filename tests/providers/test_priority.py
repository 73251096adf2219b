"""The priority lane: bounded in-flight calls, higher plans first, a bounded wait, no leaked slots."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator

import pytest
from django.test import override_settings

from providers.base import ProviderSaturated
from providers.catalog import acatalog_entries
from providers.priority import PriorityLane
from providers.registry import registry
from providers.router import Router
from providers.routing_types import RouteTrace
from tests.providers.scripted import ScriptedProvider, collect, isolated_router_state, reply, route_request, text_of

FREE, PREMIUM, ENTERPRISE = 0, 1, 2


@pytest.fixture(autouse=True)
def _state() -> Iterator[None]:
    with isolated_router_state(), override_settings(MAX_INFLIGHT_PER_PROVIDER=2, PRIORITY_MAX_WAIT_SECONDS=5):
        yield


async def wait_until(predicate: Callable[[], bool], *, limit: float = 2.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_waiters_are_admitted_by_priority_then_fifo() -> None:
    lane = PriorityLane()
    admitted: list[str] = []
    release = {name: asyncio.Event() for name in ("h1", "h2", "f1", "f2", "f3", "p1", "e1")}

    async def user(name: str, priority: int) -> None:
        async with lane.slot("openai", priority=priority, max_wait=5):
            admitted.append(name)
            await release[name].wait()

    tasks = [asyncio.create_task(user("h1", FREE)), asyncio.create_task(user("h2", FREE))]
    await wait_until(lambda: len(admitted) == 2)
    for queued, (name, priority) in enumerate(
        (("f1", FREE), ("f2", FREE), ("p1", PREMIUM), ("f3", FREE), ("e1", ENTERPRISE)), start=1
    ):
        tasks.append(asyncio.create_task(user(name, priority)))
        await wait_until(functools.partial(lambda n: lane.waiting("openai") == n, queued))
    assert lane.inflight("openai") == 2

    for done, expected in (("h1", "e1"), ("h2", "p1"), ("e1", "f1"), ("p1", "f2"), ("f1", "f3")):
        release[done].set()
        await wait_until(functools.partial(lambda e: admitted[-1] == e, expected))
        assert lane.inflight("openai") == 2
    for event in release.values():
        event.set()
    await asyncio.gather(*tasks)

    assert admitted == ["h1", "h2", "e1", "p1", "f1", "f2", "f3"]
    assert lane.inflight("openai") == 0 and lane.waiting("openai") == 0


async def test_the_wait_is_bounded() -> None:
    lane = PriorityLane()
    hold = asyncio.Event()

    async def holder() -> None:
        async with lane.slot("claude", priority=FREE, max_wait=1):
            await hold.wait()

    holders = [asyncio.create_task(holder()) for _ in range(2)]
    await wait_until(lambda: lane.inflight("claude") == 2)

    started = time.monotonic()
    with pytest.raises(ProviderSaturated) as caught:
        async with lane.slot("claude", priority=ENTERPRISE, max_wait=0.3):
            pass  # pragma: no cover
    elapsed = time.monotonic() - started

    assert caught.value.code == "provider_saturated" and caught.value.retry_after
    assert 0.3 <= elapsed < 1.5
    assert lane.waiting("claude") == 0
    hold.set()
    await asyncio.gather(*holders)
    assert lane.inflight("claude") == 0


async def test_cancelled_waiters_do_not_leak_slots() -> None:
    lane = PriorityLane()
    hold = asyncio.Event()
    entered: list[str] = []

    async def user(name: str, priority: int) -> None:
        async with lane.slot("gemini", priority=priority, max_wait=5):
            entered.append(name)
            await hold.wait()

    holders = [asyncio.create_task(user(f"h{i}", FREE)) for i in range(2)]
    await wait_until(lambda: lane.inflight("gemini") == 2)
    waiting_high = asyncio.create_task(user("high", ENTERPRISE))
    waiting_low = asyncio.create_task(user("low", FREE))
    await wait_until(lambda: lane.waiting("gemini") == 2)

    # A slot is handed to `high`, which is cancelled before it could run: the slot passes on.
    holders[0].cancel()
    await asyncio.sleep(0)
    waiting_high.cancel()
    await wait_until(lambda: "low" in entered)
    assert "high" not in entered and lane.inflight("gemini") == 2

    hold.set()
    await asyncio.gather(holders[1], waiting_low)
    for task in (holders[0], waiting_high):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert lane.inflight("gemini") == 0 and lane.waiting("gemini") == 0


# --- through the router ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_enterprise_request_waiting_with_free_ones_is_served_first() -> None:
    # Each call holds the only slot long enough for the other four to queue, even on a busy machine.
    provider = ScriptedProvider("deepseek", default=reply("ok", first_delay=0.6))
    registry.override("deepseek", provider)
    router = Router()
    deepseek = next(e for e in await acatalog_entries() if e.name == "deepseek-chat")
    served: list[str] = []

    async def ask(label: str, priority: int) -> None:
        request = route_request(deepseek, priority=priority, text=label)
        events = await collect(router, request)
        assert text_of(events) == "ok"
        served.append(label)

    with override_settings(MAX_INFLIGHT_PER_PROVIDER=1):
        tasks = [asyncio.create_task(ask("free-0", FREE))]
        await wait_until(lambda: router.lane.inflight("deepseek") == 1)
        # Each request reaches the lane before the next is sent: arrival order is what FIFO means.
        for i in range(1, 4):
            tasks.append(asyncio.create_task(ask(f"free-{i}", FREE)))
            await wait_until(lambda i=i: router.lane.waiting("deepseek") == i)  # type: ignore[misc]
        tasks.append(asyncio.create_task(ask("enterprise", ENTERPRISE)))
        await wait_until(lambda: router.lane.waiting("deepseek") == 4)
        await asyncio.gather(*tasks)

    assert served == ["free-0", "enterprise", "free-1", "free-2", "free-3"]
    assert [c.messages[-1].content for c in provider.calls] == served
    assert provider.peak_active == 1  # the slot is held for the whole upstream stream


@pytest.mark.django_db(transaction=True)
async def test_router_gives_provider_saturated_when_the_wait_runs_out() -> None:
    provider = ScriptedProvider("deepseek", default=reply("slow", first_delay=2))
    registry.override("deepseek", provider)
    router = Router()
    deepseek = next(e for e in await acatalog_entries() if e.name == "deepseek-chat")

    with override_settings(MAX_INFLIGHT_PER_PROVIDER=1, PRIORITY_MAX_WAIT_SECONDS=0.3, ENABLE_FALLBACK=False):
        holder = asyncio.create_task(collect(router, route_request(deepseek, priority=FREE)))
        await wait_until(lambda: router.lane.inflight("deepseek") == 1)
        trace = RouteTrace()
        started = time.monotonic()
        with pytest.raises(ProviderSaturated):
            await collect(router, route_request(deepseek, priority=ENTERPRISE), trace)
        elapsed = time.monotonic() - started
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder

    assert 0.3 <= elapsed < 1.5
    assert trace.attempts == 0 and trace.tried == []  # no upstream call was made
    assert len(provider.calls) == 1 and provider.active == 0
    assert router.lane.inflight("deepseek") == 0
