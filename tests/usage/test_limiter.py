"""The hourly request window: exact edges under a controlled clock, Redis atomicity, and Redis outages."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from django.conf import settings
from redis._parsers import _AsyncHiredisParser

from accounts.principal import Principal
from chatservice.redis_bounds import (
    MAX_CONNECTIONS,
    MAX_LAG_EXCUSED_SECONDS,
    REDIS_CONNECT_TIMEOUT_SECONDS,
    REDIS_TIMEOUT_SECONDS,
)
from tests.redis_proxy import RedisProxy, busy_once_redis_is_asked, socket_timeouts
from usage.limiter import LimitState, RequestLimiter, limit_hit, limit_peek, request_limiter

T0 = 1_900_000_000.0  # clock values keep <= 4 decimals: Redis stores window timestamps with 14 digits


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def at(self, offset: float) -> FakeClock:
        self.now = T0 + offset
        return self


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_limiter(clock: FakeClock) -> Iterator[Callable[..., RequestLimiter]]:
    """Limiters sharing one fresh key prefix (so runs never see each other's windows) and the test clock."""
    prefix = f"test-{uuid.uuid4().hex}"

    def make(backend: str = "redis", **kwargs: object) -> RequestLimiter:
        url = settings.REDIS_URL if backend == "redis" else ""
        options: dict = {"redis_url": url, "key_prefix": prefix, "clock": clock, **kwargs}
        return RequestLimiter(**options)

    yield make


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest, make_limiter: Callable[..., RequestLimiter]) -> AsyncIterator:
    made = make_limiter(request.param)
    yield made
    await made.aclose()


async def test_window_is_exact_at_its_edges(limiter: RequestLimiter, clock: FakeClock) -> None:
    states = []
    for offset in (0, 10, 20):
        clock.at(offset)
        states.append(await limiter.hit(user_id=1, limit=3))
    assert [(s.allowed, s.used, s.remaining) for s in states] == [(True, 1, 2), (True, 2, 1), (True, 3, 0)]

    clock.at(30)
    refused = await limiter.hit(user_id=1, limit=3)
    assert (refused.allowed, refused.used, refused.remaining) == (False, 3, 0)
    # The request at T0 counts through T0+3600 inclusive: the first whole second after it is 3571 away.
    assert refused.reset_seconds == 3571

    clock.at(3600)  # the edge itself still holds the first request
    edge = await limiter.hit(user_id=1, limit=3)
    assert (edge.allowed, edge.reset_seconds) == (False, 1)

    clock.at(3600.0001)  # just past it, one slot is free
    assert (await limiter.hit(user_id=1, limit=3)).allowed
    clock.at(3600.5)
    assert not (await limiter.hit(user_id=1, limit=3)).allowed
    clock.at(3610)
    assert not (await limiter.hit(user_id=1, limit=3)).allowed
    clock.at(3610.0001)
    after = await limiter.hit(user_id=1, limit=3)
    assert (after.allowed, after.used, after.reset_seconds) == (True, 3, 10)  # T0+20 leaves at T0+3620


@pytest.mark.parametrize("refused_at", [100.0, 100.25, 2999.9999, 3599.5])
async def test_retry_after_is_right_to_the_second(limiter: RequestLimiter, clock: FakeClock, refused_at: float) -> None:
    user = int(refused_at * 10_000)
    clock.at(0)
    assert (await limiter.hit(user_id=user, limit=1)).allowed
    clock.at(refused_at)
    refused = await limiter.hit(user_id=user, limit=1)
    assert not refused.allowed

    clock.at(refused_at + refused.reset_seconds - 1)  # one second early: still refused
    assert not (await limiter.hit(user_id=user, limit=1)).allowed
    clock.at(refused_at + refused.reset_seconds)  # on the second: admitted
    assert (await limiter.hit(user_id=user, limit=1)).allowed


async def test_refused_requests_do_not_count(limiter: RequestLimiter, clock: FakeClock) -> None:
    clock.at(0)
    assert (await limiter.hit(user_id=2, limit=2)).allowed
    assert (await limiter.hit(user_id=2, limit=2)).allowed
    for step in range(50):
        clock.at(1 + step * 70)  # refused all through the hour
        assert not (await limiter.hit(user_id=2, limit=2)).allowed

    clock.at(3601)  # both admitted requests have left; had refusals counted, this would be refused
    state = await limiter.hit(user_id=2, limit=2)
    assert (state.allowed, state.used, state.remaining) == (True, 1, 1)


async def test_peek_counts_nothing(limiter: RequestLimiter, clock: FakeClock) -> None:
    clock.at(0)
    empty = await limiter.peek(user_id=3, limit=5)
    assert empty == LimitState(limit=5, used=0, remaining=5, reset_seconds=0, allowed=True)
    for _ in range(4):
        await limiter.peek(user_id=3, limit=5)
    await limiter.hit(user_id=3, limit=5)
    clock.at(0.5)
    state = await limiter.peek(user_id=3, limit=5)
    assert (state.used, state.remaining, state.reset_seconds, state.allowed) == (1, 4, 3600, True)


async def test_unhit_takes_back_exactly_the_request_it_counted(limiter: RequestLimiter, clock: FakeClock) -> None:
    clock.at(0)
    first = await limiter.hit(user_id=3, limit=2)
    clock.at(10)
    second = await limiter.hit(user_id=3, limit=2)
    refused = await limiter.hit(user_id=3, limit=2)
    assert (first.counted_at, second.counted_at, refused.counted_at) == (T0, T0 + 10, None)

    await limiter.unhit(user_id=3, state=refused)  # counted nothing: takes nothing back
    assert (await limiter.peek(user_id=3, limit=2)).used == 2
    await limiter.unhit(user_id=3, state=second)
    state = await limiter.peek(user_id=3, limit=2)
    # The first request is still counted, and the window's reset is still its edge (T0 + 3600).
    assert (state.used, state.reset_seconds) == (1, 3591)
    await limiter.unhit(user_id=3, state=second)  # already taken back: nothing more goes
    assert (await limiter.peek(user_id=3, limit=2)).used == 1
    assert (await limiter.hit(user_id=3, limit=2)).allowed


async def test_a_hit_cancelled_after_it_reached_redis_is_taken_back(
    make_limiter: Callable[..., RequestLimiter],
) -> None:
    """A request cancelled while its hit is on its way (the client left during admission) is not
    counted, even when Redis ran the script and only its reply was still to come."""
    proxy = RedisProxy()
    await proxy.start()
    through_proxy = make_limiter("redis", redis_url=proxy.url)
    direct = make_limiter("redis")
    await through_proxy.hit(user_id=9, limit=5)  # connected, the script loaded
    await direct.clear(user_id=9)
    proxy.replies_lost = True
    hit = asyncio.ensure_future(through_proxy.hit(user_id=9, limit=5))
    for _ in range(200):
        if (await direct.peek(user_id=9, limit=5)).used:
            break
        await asyncio.sleep(0.01)
    assert (await direct.peek(user_id=9, limit=5)).used == 1  # Redis counted it; the answer is lost
    proxy.replies_lost = False
    hit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hit
    for _ in range(200):
        if not (await direct.peek(user_id=9, limit=5)).used:
            break
        await asyncio.sleep(0.01)
    assert (await direct.peek(user_id=9, limit=5)).used == 0
    await through_proxy.aclose()
    await direct.aclose()
    await proxy.stop()


async def test_window_is_per_user_and_survives_a_limit_change(limiter: RequestLimiter, clock: FakeClock) -> None:
    clock.at(0)
    for _ in range(3):
        assert (await limiter.hit(user_id=4, limit=5)).allowed
    assert (await limiter.peek(user_id=5, limit=5)).used == 0
    lowered = await limiter.hit(user_id=4, limit=2)  # a downgrade holds at once
    assert (lowered.allowed, lowered.used) == (False, 2)
    raised = await limiter.hit(user_id=4, limit=10)
    assert (raised.allowed, raised.used) == (True, 4)


async def test_zero_limit_refuses_without_counting(limiter: RequestLimiter) -> None:
    state = await limiter.hit(user_id=6, limit=0)
    assert not state.allowed
    assert (await limiter.peek(user_id=6, limit=3)).used == 0


async def test_the_redis_window_keeps_only_the_requests_still_in_it(
    make_limiter: Callable[..., RequestLimiter], clock: FakeClock
) -> None:
    """Requests that left the window leave Redis too: with a limit far above the traffic, the list
    would otherwise hold every request for as long as the user keeps calling within the hour."""
    limiter = make_limiter("redis")
    for offset in (0, 10, 20, 30):
        clock.at(offset)
        await limiter.hit(user_id=14, limit=1_000_000)
    strategy = limiter._shared_strategy()
    assert strategy is not None
    client = strategy.storage.bridge.get_connection()  # type: ignore[attr-defined]
    key = f"{limiter.key_prefix}:requests/user/14"
    assert await client.llen(key) == 4

    clock.at(3615)  # T0 and T0+10 have left the window
    state = await limiter.hit(user_id=14, limit=1_000_000)
    assert (state.allowed, state.used, state.reset_seconds) == (True, 3, 6)  # T0+20 leaves at T0+3620
    assert [float(v) for v in await client.lrange(key, 0, -1)] == [T0 + 3615, T0 + 30, T0 + 20]

    clock.at(9000)  # all of them have left: the next request starts a new window
    state = await limiter.hit(user_id=14, limit=1_000_000)
    assert (state.used, state.reset_seconds) == (1, 3601)
    assert await client.llen(key) == 1
    await limiter.aclose()


async def test_redis_window_is_atomic_across_clients(make_limiter: Callable[..., RequestLimiter]) -> None:
    # Eight limiters: eight connection pools, as eight processes would have; the real clock.
    limiters = [make_limiter("redis", clock=time.time) for _ in range(8)]
    results = await asyncio.gather(*(lim.hit(user_id=7, limit=37) for lim in limiters for _ in range(25)))
    assert sum(state.allowed for state in results) == 37
    assert (await limiters[0].peek(user_id=7, limit=37)).used == 37
    for lim in limiters:
        await lim.aclose()


def test_in_process_window_holds_across_threads_and_event_loops(make_limiter: Callable[..., RequestLimiter]) -> None:
    limiter = make_limiter("memory")
    allowed: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        async def run() -> list[bool]:
            return [(await limiter.hit(user_id=8, limit=23)).allowed for _ in range(10)]

        outcome = asyncio.run(run())  # each thread its own event loop, as sync views give
        with lock:
            allowed.extend(outcome)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(allowed) == 60
    assert sum(allowed) == 23


async def test_redis_outage_degrades_to_the_process_window_and_recovers(
    make_limiter: Callable[..., RequestLimiter], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="usage.limiter")
    proxy = RedisProxy()
    await proxy.start()
    limiter = make_limiter("redis", redis_url=proxy.url, probe_interval=0)
    shared = make_limiter("redis")  # reads the same Redis directly
    for _ in range(3):
        assert (await limiter.hit(user_id=9, limit=4)).allowed
    assert (await shared.peek(user_id=9, limit=4)).used == 3

    await proxy.stop()
    during = [await limiter.hit(user_id=9, limit=4) for _ in range(6)]
    # Admitted up to the per-process limit, then refused; Redis saw none of it.
    assert [s.allowed for s in during] == [True, True, True, True, False, False]
    assert limiter.degraded
    assert (await shared.peek(user_id=9, limit=4)).used == 3
    warnings = [r for r in caplog.records if r.name == "usage.limiter" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]

    await proxy.start()  # Redis is back on the same address
    assert (await limiter.hit(user_id=9, limit=4)).allowed  # the 4th in the shared window
    assert not (await limiter.hit(user_id=9, limit=4)).allowed
    assert not limiter.degraded
    assert (await shared.peek(user_id=9, limit=4)).used == 4
    assert any("reachable again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    await limiter.aclose()
    await shared.aclose()
    await proxy.stop()


async def test_a_redis_that_hangs_costs_one_bounded_wait_then_the_process_window(
    make_limiter: Callable[..., RequestLimiter],
) -> None:
    proxy = RedisProxy()
    await proxy.start()
    limiter = make_limiter("redis", redis_url=proxy.url, probe_interval=3600)
    assert (await limiter.hit(user_id=5, limit=10)).allowed
    assert not limiter.degraded

    proxy.hung = True  # the connection stays open; no answer ever comes
    started = time.monotonic()
    state = await asyncio.wait_for(limiter.hit(user_id=5, limit=10), timeout=REDIS_TIMEOUT_SECONDS * 5)
    waited = time.monotonic() - started
    assert state.allowed and limiter.degraded  # counted in this process's window instead
    assert waited >= REDIS_TIMEOUT_SECONDS * 0.9  # the bound, not an error at once
    started = time.monotonic()
    assert (await limiter.hit(user_id=5, limit=10)).allowed
    assert time.monotonic() - started < REDIS_TIMEOUT_SECONDS  # degraded: Redis is not waited for again

    await limiter.aclose()
    await proxy.stop()


async def test_a_busy_event_loop_is_not_a_redis_outage(make_limiter: Callable[..., RequestLimiter]) -> None:
    """Redis answered in time; this loop was too busy to read the answer within the bound. That is no
    outage: counting in the per-process window instead let each process admit a whole limit of its own
    (seen as 12 and 15 admitted of 10 by two loaded processes)."""
    proxy = RedisProxy()
    await proxy.start()
    other, this = make_limiter("redis"), make_limiter("redis", redis_url=proxy.url)  # two processes, one window
    for _ in range(10):
        assert (await other.hit(user_id=17, limit=10)).allowed
    assert not (await this.hit(user_id=17, limit=10)).allowed  # connected; the window is full

    busy_once_redis_is_asked(proxy, REDIS_TIMEOUT_SECONDS * 1.5)
    state = await this.hit(user_id=17, limit=10)
    assert not state.allowed and not this.degraded
    assert not any([(await this.hit(user_id=17, limit=10)).allowed for _ in range(5)])
    assert (await other.peek(user_id=17, limit=10)).used == 10
    await other.aclose()
    await this.aclose()
    await proxy.stop()


async def test_a_redis_that_hangs_is_given_up_on_even_while_the_loop_stays_busy(
    make_limiter: Callable[..., RequestLimiter],
) -> None:
    proxy = RedisProxy()
    await proxy.start()
    limiter = make_limiter("redis", redis_url=proxy.url, probe_interval=3600)
    assert (await limiter.hit(user_id=18, limit=10)).allowed
    proxy.hung = True
    stop = time.monotonic() + REDIS_TIMEOUT_SECONDS + MAX_LAG_EXCUSED_SECONDS + 3

    def busy() -> None:  # the loop is late by 0.2 s every turn, for longer than any bound
        time.sleep(0.2)
        if time.monotonic() < stop:
            asyncio.get_running_loop().call_soon(busy)

    asyncio.get_running_loop().call_soon(busy)
    started = time.monotonic()
    state = await limiter.hit(user_id=18, limit=10)
    waited = time.monotonic() - started
    assert state.allowed and limiter.degraded
    assert REDIS_TIMEOUT_SECONDS <= waited < REDIS_TIMEOUT_SECONDS + MAX_LAG_EXCUSED_SECONDS + 1
    await asyncio.sleep(max(0.0, stop - time.monotonic()))
    await limiter.aclose()
    await proxy.stop()


async def test_outage_waits_probe_interval_before_trying_redis_again(
    make_limiter: Callable[..., RequestLimiter],
) -> None:
    proxy = RedisProxy()
    await proxy.start()
    limiter = make_limiter("redis", redis_url=proxy.url, probe_interval=3600)
    shared = make_limiter("redis")
    await proxy.stop()
    assert (await limiter.hit(user_id=10, limit=5)).allowed
    await proxy.start()
    assert (await limiter.hit(user_id=10, limit=5)).allowed  # still on the process window
    assert limiter.degraded
    assert (await shared.peek(user_id=10, limit=5)).used == 0
    await limiter.aclose()
    await shared.aclose()
    await proxy.stop()


def _principal(user_id: int, requests_per_hour: int) -> Principal:
    return Principal(
        user_id=user_id,
        username=f"u{user_id}",
        is_staff=False,
        plan="free",
        priority=0,
        allowed_providers=frozenset({"deepseek"}),
        requests_per_hour=requests_per_hour,
        tokens_per_day=1000,
        api_key_id=None,
    )


async def test_limit_hit_and_peek_use_the_principal_and_the_settings(settings: object) -> None:
    settings.RATE_LIMIT_NAMESPACE = f"test-{uuid.uuid4().hex}"  # type: ignore[attr-defined]
    principal = _principal(11, requests_per_hour=2)
    limiter = request_limiter()
    assert limiter.redis_url == settings.REDIS_URL  # type: ignore[attr-defined]
    assert [(await limit_hit(principal)).allowed for _ in range(3)] == [True, True, False]
    peeked = await limit_peek(principal)
    assert (peeked.used, peeked.remaining, peeked.allowed) == (2, 0, False)

    settings.REDIS_URL = ""  # type: ignore[attr-defined]
    assert request_limiter().redis_url == ""
    assert (await limit_hit(principal)).allowed  # a fresh in-process window
    await limiter.aclose()


async def test_the_shared_window_has_no_per_command_socket_timeout(
    make_limiter: Callable[..., RequestLimiter],
) -> None:
    """redis-py 8 sets a 5 s socket_timeout by default, which wraps every command's write in a
    task (asyncio.wait_for); the operation's own bound (REDIS_TIMEOUT_SECONDS) is what applies."""
    limiter = make_limiter("redis")
    assert (await limiter.hit(user_id=6, limit=10)).allowed
    strategy = limiter._shared_strategy()
    assert strategy is not None
    client = strategy.storage.bridge.get_connection()  # type: ignore[attr-defined]
    assert await socket_timeouts(client) == (None, REDIS_CONNECT_TIMEOUT_SECONDS)
    await limiter.aclose()


async def test_the_shared_window_reads_redis_replies_with_hiredis(make_limiter: Callable[..., RequestLimiter]) -> None:
    limiter = make_limiter("redis")
    assert (await limiter.hit(user_id=7, limit=5)).allowed
    strategy = limiter._shared_strategy()
    assert strategy is not None
    pool = strategy.storage.bridge.get_connection().connection_pool  # type: ignore[attr-defined]
    # redis-py reads replies with hiredis when it is installed (a requirement): a tenth less CPU per command.
    assert [type(c._parser) for c in pool._available_connections] == [_AsyncHiredisParser]
    await limiter.aclose()


async def test_a_burst_larger_than_the_connection_pool_is_counted_in_redis(
    make_limiter: Callable[..., RequestLimiter], caplog: pytest.LogCaptureFixture
) -> None:
    """More concurrent hits than a pool has connections wait for one: none fails over to the
    per-process window (redis-py raises MaxConnectionsError past the pool's size)."""
    limiter = make_limiter("redis")
    burst = 4 * MAX_CONNECTIONS
    with caplog.at_level(logging.WARNING, logger="usage.limiter"):
        states = await asyncio.gather(*(limiter.hit(user_id=8, limit=10 * burst) for _ in range(burst)))
    assert all(state.allowed for state in states) and not limiter.degraded
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert sorted(state.used for state in states) == list(range(1, burst + 1))  # each hit saw the one before
    assert (await limiter.peek(user_id=8, limit=10 * burst)).used == burst
    await limiter.aclose()


async def test_the_hits_of_concurrent_requests_go_to_redis_together(
    make_limiter: Callable[..., RequestLimiter],
) -> None:
    proxy = RedisProxy()
    await proxy.start()
    limiter = make_limiter("redis", redis_url=proxy.url)
    assert (await limiter.hit(user_id=12, limit=1000)).used == 1  # connects and loads the script
    before = proxy.sent
    states = await asyncio.gather(*(limiter.hit(user_id=12, limit=1000) for _ in range(200)))
    assert sorted(state.used for state in states) == list(range(2, 202))
    assert proxy.sent - before < 40  # 200 hits in a few pipelines, not 200 writes (one may span reads)
    await limiter.aclose()
    await proxy.stop()


async def test_hits_still_count_after_redis_forgot_the_script(make_limiter: Callable[..., RequestLimiter]) -> None:
    limiter = make_limiter("redis")
    assert (await limiter.hit(user_id=13, limit=100)).used == 1
    strategy = limiter._shared_strategy()
    assert strategy is not None
    storage = strategy.storage
    await storage.bridge.get_connection().script_flush()  # type: ignore[attr-defined]
    # A batch of several hits is one pipeline of EVALSHA: each gets NOSCRIPT, and all are sent again.
    key = "requests/user/13"
    batch = await storage._send_hits([(key, T0, 100, 3600)] * 3)  # type: ignore[attr-defined]
    assert [(acquired, count) for acquired, _, count in batch] == [(True, 2), (True, 3), (True, 4)]
    await storage.bridge.get_connection().script_flush()  # type: ignore[attr-defined]
    states = await asyncio.gather(*(limiter.hit(user_id=13, limit=100) for _ in range(10)))  # alone, then batched
    assert sorted(state.used for state in states) == list(range(5, 15)) and not limiter.degraded
    await limiter.aclose()


async def test_hits_sent_while_redis_hung_do_not_keep_it_from_being_used_again(
    make_limiter: Callable[..., RequestLimiter],
) -> None:
    proxy = RedisProxy()
    await proxy.start()
    limiter = make_limiter("redis", redis_url=proxy.url, probe_interval=0)
    assert (await limiter.hit(user_id=15, limit=100)).allowed
    strategy = limiter._shared_strategy()
    assert strategy is not None

    proxy.hung = True  # everything sent from now on is swallowed, never answered

    async def wave(delay: float) -> list[LimitState]:
        await asyncio.sleep(delay)
        return await asyncio.gather(*(limiter.hit(user_id=15, limit=100) for _ in range(12)))

    # The second wave is still waiting when the first gives up, so it goes out as a batch, into the hang.
    first, second = await asyncio.gather(wave(0), wave(REDIS_TIMEOUT_SECONDS / 2))
    assert all(s.allowed for s in first + second) and limiter.degraded  # counted per process meanwhile

    proxy.hung = False
    # The batch sent into the hang gives up within the bound too (it holds a connection meanwhile).
    await asyncio.wait_for(strategy.storage._hits.drained(), timeout=REDIS_TIMEOUT_SECONDS * 2)  # type: ignore[attr-defined]
    assert (await asyncio.wait_for(limiter.hit(user_id=15, limit=100), timeout=REDIS_TIMEOUT_SECONDS * 2)).allowed
    assert not limiter.degraded  # Redis counts again
    await limiter.aclose()
    await proxy.stop()
