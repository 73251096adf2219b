"""The circuit breaker: thresholds, cooldown, one half-open probe, shared state over Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings

from chatservice.redis_bounds import MAX_CONNECTIONS, REDIS_CONNECT_TIMEOUT_SECONDS, REDIS_TIMEOUT_SECONDS
from providers.base import AllProvidersFailed, ProviderUnavailable
from providers.catalog import acatalog_entries
from providers.circuit import STATE_CACHE_SECONDS, Admission, Circuit, SharedRedis
from providers.registry import registry
from providers.router import Router
from providers.routing_types import RouteTrace
from tests.providers.scripted import FakeClock, ScriptedProvider, collect, fail, isolated_router_state, route_request
from tests.redis_proxy import RedisProxy, busy_once_redis_is_asked, socket_timeouts

BACKENDS = ["redis", "in-process"]


@pytest.fixture(autouse=True)
def _state() -> Iterator[str]:
    with (
        isolated_router_state() as namespace,
        override_settings(CIRCUIT_FAILURE_THRESHOLD=3, CIRCUIT_COOLDOWN_SECONDS=30, REQUEST_DEADLINE_SECONDS=60),
    ):
        yield namespace


def make_circuit(backend: str, clock: FakeClock) -> Circuit:
    return Circuit(clock=clock, redis=SharedRedis(None if backend == "redis" else ""))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_opens_after_threshold_consecutive_failures(backend: str) -> None:
    clock = FakeClock()
    circuit = make_circuit(backend, clock)

    for _ in range(2):
        await circuit.record_failure("openai")
    assert await circuit.allow("openai") is Admission.ALLOWED
    await circuit.record_failure("openai")

    assert await circuit.allow("openai") is Admission.DENIED
    assert await circuit.is_open("openai")
    assert (await circuit.snapshot("openai")).state == "open"
    assert await circuit.retry_after("openai") == pytest.approx(30)
    assert await circuit.allow("claude") is Admission.ALLOWED  # per provider


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_success_resets_the_count(backend: str) -> None:
    circuit = make_circuit(backend, FakeClock())
    for _ in range(2):
        await circuit.record_failure("openai")
    await circuit.record_success("openai")
    for _ in range(2):
        await circuit.record_failure("openai")
    assert await circuit.allow("openai") is Admission.ALLOWED


@pytest.mark.parametrize("backend", BACKENDS)
async def test_after_the_cooldown_exactly_one_probe(backend: str) -> None:
    clock = FakeClock()
    circuit = make_circuit(backend, clock)
    for _ in range(3):
        await circuit.record_failure("openai")

    clock.advance(29.9)
    assert await circuit.allow("openai") is Admission.DENIED
    clock.advance(0.2)
    verdicts = await asyncio.gather(*(circuit.allow("openai") for _ in range(10)))
    assert verdicts.count(Admission.PROBE) == 1 and verdicts.count(Admission.DENIED) == 9
    assert await circuit.is_open("openai")  # half-open with its probe out: still no traffic

    await circuit.record_success("openai")
    assert await circuit.allow("openai") is Admission.ALLOWED
    assert (await circuit.snapshot("openai")).state == "closed"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_failed_probe_reopens_for_another_cooldown(backend: str) -> None:
    clock = FakeClock()
    circuit = make_circuit(backend, clock)
    for _ in range(3):
        await circuit.record_failure("openai")
    clock.advance(31)
    assert await circuit.allow("openai") is Admission.PROBE

    await circuit.record_failure("openai")

    assert await circuit.allow("openai") is Admission.DENIED
    assert await circuit.retry_after("openai") == pytest.approx(30)
    clock.advance(31)
    assert await circuit.allow("openai") is Admission.PROBE


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_released_probe_lets_the_next_one_through(backend: str) -> None:
    clock = FakeClock()
    circuit = make_circuit(backend, clock)
    for _ in range(3):
        await circuit.record_failure("openai")
    clock.advance(31)
    assert await circuit.allow("openai") is Admission.PROBE
    assert await circuit.allow("openai") is Admission.DENIED

    await circuit.release_probe("openai")

    assert await circuit.allow("openai") is Admission.PROBE


async def test_state_is_shared_between_instances_over_redis() -> None:
    """Two breakers with their own Redis connections, as two processes would have."""
    clock = FakeClock()
    first, second = make_circuit("redis", clock), make_circuit("redis", clock)

    await first.record_failure("gemini")
    await second.record_failure("gemini")
    await first.record_failure("gemini")

    assert await second.allow("gemini") is Admission.DENIED
    clock.advance(31)
    probes = await asyncio.gather(*(c.allow("gemini") for c in (first, second) for _ in range(5)))
    assert probes.count(Admission.PROBE) == 1
    await second.record_success("gemini")
    assert await first.allow("gemini") is Admission.ALLOWED


async def test_a_circuit_another_process_opened_is_seen_within_the_cache_bound() -> None:
    clock = FakeClock()
    here, elsewhere = make_circuit("redis", clock), make_circuit("redis", clock)
    assert await here.allow("openai") is Admission.ALLOWED
    for _ in range(3):
        await elsewhere.record_failure("openai")

    clock.advance(STATE_CACHE_SECONDS * 0.9)
    assert await here.allow("openai") is Admission.ALLOWED  # the closed state read a moment ago
    clock.advance(STATE_CACHE_SECONDS * 0.1)
    assert await here.allow("openai") is Admission.DENIED


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_failure_here_is_seen_at_once(backend: str) -> None:
    clock = FakeClock()
    circuit = make_circuit(backend, clock)
    for _ in range(3):
        assert await circuit.allow("openai") is Admission.ALLOWED
        await circuit.record_failure("openai")
    assert await circuit.allow("openai") is Admission.DENIED


async def test_a_healthy_provider_costs_no_redis_command_per_request() -> None:
    proxy = RedisProxy()
    await proxy.start()
    clock = FakeClock()
    circuit = Circuit(clock=clock, redis=SharedRedis(proxy.url))
    assert await circuit.allow("openai") is Admission.ALLOWED
    await circuit.record_success("openai")
    sent = proxy.sent

    for _ in range(20):
        assert await circuit.allow("openai") is Admission.ALLOWED
        await circuit.record_success("openai")
    assert proxy.sent == sent

    clock.advance(STATE_CACHE_SECONDS)
    assert await circuit.allow("openai") is Admission.ALLOWED
    assert proxy.sent == sent + 1  # read again once the bound passed
    await proxy.stop()


async def test_a_success_still_resets_failures_counted_elsewhere() -> None:
    clock = FakeClock()
    here, elsewhere = make_circuit("redis", clock), make_circuit("redis", clock)
    for _ in range(2):
        await elsewhere.record_failure("openai")
    assert await here.allow("openai") is Admission.ALLOWED
    await here.record_success("openai")
    await elsewhere.record_failure("openai")
    assert (await here.snapshot("openai")).failures == 1


async def test_in_process_state_is_not_shared() -> None:
    clock = FakeClock()
    first, second = make_circuit("in-process", clock), make_circuit("in-process", clock)
    for _ in range(3):
        await first.record_failure("gemini")
    assert await first.allow("gemini") is Admission.DENIED
    assert await second.allow("gemini") is Admission.ALLOWED


@pytest.mark.django_db(transaction=True)
async def test_two_routers_share_the_circuit_over_redis() -> None:
    scripted = ScriptedProvider("openai", default=fail(ProviderUnavailable, status=503))
    registry.override("openai", scripted)
    clock = FakeClock()
    router_a = Router(circuit=Circuit(clock=clock, redis=SharedRedis()))
    router_b = Router(circuit=Circuit(clock=clock, redis=SharedRedis()))
    gpt = next(e for e in await acatalog_entries() if e.name == "gpt-4o-mini")

    with override_settings(ENABLE_FALLBACK=False, MAX_RETRY_ATTEMPTS=3, RETRY_DELAY_SECONDS=0):
        with pytest.raises(ProviderUnavailable):
            await collect(router_a, route_request(gpt, allowed={"openai"}))
        trace = RouteTrace()
        with pytest.raises(AllProvidersFailed):
            await collect(router_b, route_request(gpt, allowed={"openai"}), trace)

    assert len(scripted.calls) == 3
    assert trace.attempts == 0 and trace.tried == []


async def test_unreachable_redis_degrades_to_in_process_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    circuit = Circuit(clock=FakeClock(), redis=SharedRedis("redis://127.0.0.1:1/0"))

    with caplog.at_level(logging.WARNING, logger="providers.circuit"):
        for _ in range(3):
            await circuit.record_failure("claude")
        assert await circuit.allow("claude") is Admission.DENIED
        assert await circuit.allow("deepseek") is Admission.ALLOWED

    outage_warnings = [r for r in caplog.records if "redis unreachable" in r.getMessage()]
    assert len(outage_warnings) == 1


async def test_a_redis_that_hangs_is_waited_for_once_within_the_bound() -> None:
    proxy = RedisProxy()
    await proxy.start()
    shared = SharedRedis(proxy.url)
    clock = FakeClock()
    circuit = Circuit(clock=clock, redis=shared)
    assert await circuit.allow("openai") is Admission.ALLOWED
    assert not shared.degraded

    proxy.hung = True  # the connection stays open; no answer ever comes
    clock.advance(STATE_CACHE_SECONDS)  # the closed state read above is no longer taken as read
    started = time.monotonic()
    verdict = await asyncio.wait_for(circuit.allow("openai"), timeout=REDIS_TIMEOUT_SECONDS * 5)
    assert verdict is Admission.ALLOWED and shared.degraded  # the in-process circuit answered
    assert time.monotonic() - started >= REDIS_TIMEOUT_SECONDS * 0.9
    started = time.monotonic()
    await circuit.record_success("openai")
    assert time.monotonic() - started < REDIS_TIMEOUT_SECONDS  # degraded: Redis is not waited for again
    await proxy.stop()


async def test_a_busy_event_loop_still_sees_the_circuit_another_process_opened() -> None:
    """Redis answered in time; this loop was too busy to read the answer within the bound. Taking that
    for an outage kept this process on its own (closed) circuits for REDIS_RETRY_SECONDS."""
    proxy = RedisProxy()
    await proxy.start()
    clock = FakeClock()
    other, shared = Circuit(clock=clock, redis=SharedRedis()), SharedRedis(proxy.url)
    circuit = Circuit(clock=clock, redis=shared)
    assert await circuit.allow("openai") is Admission.ALLOWED  # connected
    for _ in range(3):
        await other.record_failure("openai")
    clock.advance(STATE_CACHE_SECONDS)

    busy_once_redis_is_asked(proxy, REDIS_TIMEOUT_SECONDS * 1.5)
    assert await circuit.allow("openai") is Admission.DENIED
    assert not shared.degraded
    await proxy.stop()


async def test_the_shared_state_has_no_per_command_socket_timeout() -> None:
    """As for the limiter: a hung Redis is bounded per operation, not per command (see above)."""
    shared = SharedRedis()
    client = shared.client()
    assert client is not None
    assert await client.ping()
    assert await socket_timeouts(client) == (None, REDIS_CONNECT_TIMEOUT_SECONDS)
    await client.aclose()


async def test_a_burst_larger_than_the_connection_pool_stays_on_redis(_state: str) -> None:
    """More concurrent operations than a pool has connections wait for one, rather than failing
    with MaxConnectionsError and sending router state to the per-process fallback."""
    shared = SharedRedis()
    key = f"{_state}:burst"
    burst = 4 * MAX_CONNECTIONS

    async def incr(client: Any) -> int:
        return int(await client.incr(key))

    results = await asyncio.gather(*(shared.run(incr, lambda: -1) for _ in range(burst)))
    assert sorted(results) == list(range(1, burst + 1)) and not shared.degraded
    client = shared.client()
    assert client is not None
    await client.delete(key)
    await client.aclose()


async def test_a_burst_that_finds_the_state_stale_shares_one_read_and_one_reset() -> None:
    """When the remembered closed state runs out under load, the requests that find it so share
    one Redis read, and their successes one reset: not one round trip per request."""
    proxy = RedisProxy()
    await proxy.start()
    clock = FakeClock()
    elsewhere = make_circuit("redis", clock)
    circuit = Circuit(clock=clock, redis=SharedRedis(proxy.url))
    await elsewhere.record_failure("openai")  # counted by another process: a success must reset it
    assert await circuit.allow("openai") is Admission.ALLOWED  # connects; remembers "closed, 1 failure"
    clock.advance(STATE_CACHE_SECONDS)
    sent = proxy.sent

    verdicts = await asyncio.gather(*(circuit.allow("openai") for _ in range(50)))
    assert verdicts == [Admission.ALLOWED] * 50
    assert proxy.sent == sent + 1

    await asyncio.gather(*(circuit.record_success("openai") for _ in range(50)))
    assert proxy.sent == sent + 2
    assert (await elsewhere.snapshot("openai")).failures == 0
    await proxy.stop()


async def test_a_failure_here_during_a_shared_read_is_not_hidden_by_it() -> None:
    """A request that comes after a failure recorded here does not take the answer of a read
    sent before that failure: it reads again, and sees the circuit the failure opened."""

    class HeldFirstAnswer(SharedRedis):
        """Redis, except that the first answer is held until `release` is set."""

        def __init__(self) -> None:
            super().__init__()
            self.release = asyncio.Event()
            self.calls = 0

        async def run(self, remote: Any, local: Any) -> Any:
            self.calls += 1
            result = await super().run(remote, local)
            if self.calls == 1:
                await self.release.wait()
            return result

    clock = FakeClock()
    redis = HeldFirstAnswer()
    circuit = Circuit(clock=clock, redis=redis)
    first = asyncio.ensure_future(circuit.allow("openai"))  # reads "closed"; the answer is held
    await asyncio.sleep(0.05)
    for _ in range(3):
        await circuit.record_failure("openai")  # the third opens the circuit
    after = asyncio.ensure_future(circuit.allow("openai"))
    await asyncio.sleep(0.05)
    redis.release.set()
    assert await first is Admission.ALLOWED
    assert await after is Admission.DENIED


async def test_a_shared_read_whose_caller_is_cancelled_still_answers_the_others() -> None:
    proxy = RedisProxy()
    await proxy.start()
    clock = FakeClock()
    shared = SharedRedis(proxy.url)
    circuit = Circuit(clock=clock, redis=shared)
    assert await circuit.allow("openai") is Admission.ALLOWED
    clock.advance(STATE_CACHE_SECONDS)
    proxy.hung = True  # the leader's read will not come back

    leader = asyncio.ensure_future(circuit.allow("openai"))
    await asyncio.sleep(0.05)
    follower = asyncio.ensure_future(circuit.allow("openai"))
    await asyncio.sleep(0.05)
    leader.cancel()
    # The follower is not cancelled with it: it reads by itself, waits out the hung Redis once
    # (within the bound), and is answered by the in-process circuit.
    assert await asyncio.wait_for(follower, timeout=REDIS_TIMEOUT_SECONDS * 5) is Admission.ALLOWED
    assert leader.cancelled() and shared.degraded
    await proxy.stop()
