"""Requests per hour per user: an exact moving window on `limits`, in Redis when configured, per process otherwise.

The window is `limits`' moving window: a request counts from the instant it is admitted through the
instant one window later, inclusive, and a refused request is never counted. With REDIS_URL set the
window lives in Redis and is updated by Lua scripts (a hit by `_ACQUIRE_AND_WINDOW` below, which also
drops the requests that left the window; a read by `limits`' own), so it is atomic across processes and
machines; without it, or while Redis is unreachable, each process keeps its own window (a warning is
logged once per outage, and Redis is used again as soon as it answers).

Clock: `limits` reads `time.time()` inside its storages, which a test cannot move. The two storage
methods the moving-window strategy calls (`acquire_entry`, `get_moving_window`) are overridden here to
read `RequestLimiter.clock` instead; for Redis they pass that timestamp to the library's own Lua scripts,
so the same clock drives the Redis and the in-process window and both can be tested at their edges.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import operator
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from django.conf import settings
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.storage.redis.redispy import RedispyBridge
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from accounts.principal import Principal
from chatservice.batches import Batches
from chatservice.redis_bounds import CLIENT_OPTIONS, REDIS_ERRORS, command_slots, redis_deadline

logger = logging.getLogger(__name__)
T = TypeVar("T")
Clock = Callable[[], float]

WINDOW_SECONDS = 3600
PROBE_INTERVAL_SECONDS = 5.0  # while Redis is down, how often a request tries it again
_SWEEP_EVERY = 1000  # in-process windows: drop idle users' windows every this many hits


# The moving window as one script. KEYS[1] the window: timestamps, newest first; ARGV: now, limit,
# expiry. Entries that left the window are dropped from the old end first (each is dropped once, so a
# hit costs O(1) however long the window: `limits`' own scripts bisect it with LINDEX, which cost
# ~75 µs of Redis per hit at a limit of ten million, this ~25), then one request is counted if fewer
# than `limit` remain, as `limits`' acquire_moving_window.lua does. Returns {acquired 0|1, oldest
# counted timestamp, count}, the count and the oldest taken among the newest `limit` entries (a limit
# lowered below what the window holds is full at once).
_ACQUIRE_AND_WINDOW = """
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local expiry = tonumber(ARGV[3])
local since = now - expiry
local key = KEYS[1]
local newest = redis.call('lindex', key, 0)
if newest and tonumber(newest) < since then
    redis.call('del', key)
else
    local oldest = redis.call('lindex', key, -1)
    while oldest and tonumber(oldest) < since do
        redis.call('rpop', key)
        oldest = redis.call('lindex', key, -1)
    end
end
local count = redis.call('llen', key)
local acquired = 0
if count < limit then
    redis.call('lpush', key, ARGV[1])
    redis.call('ltrim', key, 0, limit - 1)
    redis.call('expire', key, expiry)
    acquired = 1
    count = count + 1
end
if count > limit then
    count = limit
end
if count == 0 then
    return {acquired, '0', 0}
end
return {acquired, redis.call('lindex', key, count - 1), count}
"""


@dataclass(frozen=True, slots=True)
class LimitState:
    """A user's hourly request window: `used` already includes an admitted request."""

    limit: int
    used: int
    remaining: int
    reset_seconds: int  # whole seconds until the oldest counted request leaves the window (0: none)
    allowed: bool
    counted_at: float | None = None  # the instant a hit counted this request at (None: not counted)


class _UserWindow(RateLimitItemPerSecond):
    """A window of `amount` requests per `multiples` seconds, keyed by user alone.

    `limits` puts the amount in the key; leaving it out keeps a user's window when their plan's
    limit changes (the scripts only look at the newest `limit` entries, so a lower limit holds at once).
    """

    def key_for(self, *identifiers: bytes | str | int | float) -> str:
        return "/".join([self.namespace, *(str(part) for part in identifiers)])


class _ClockedMemoryStorage(MemoryStorage):
    """`limits`' in-process storage with the moving window read from `clock`, safe across event loops.

    Timestamps are kept newest first and trimmed to the limit on each hit, as the Redis script does,
    so memory stays bounded without the library's background expiry task (which reads `time.time()`).
    A thread lock (no await inside) replaces per-loop asyncio locks: sync views run the async pipeline
    on short-lived loops, and this storage outlives them.
    """

    def __init__(self, *, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self._windows: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._hits = 0

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self._acquire(key, limit, expiry, amount, self.clock())

    def _acquire(self, key: str, limit: int, expiry: int, amount: int, now: float) -> bool:
        if amount > limit:
            return False
        with self._lock:
            window = self._windows.setdefault(key, [])
            if len(window) > limit - amount and window[limit - amount] >= now - expiry:
                return False
            window[:0] = [now] * amount
            del window[limit:]
            self._hits += 1
            if self._hits % _SWEEP_EVERY == 0:
                self._sweep(now, expiry)
        return True

    async def acquire_and_window(self, key: str, limit: int, expiry: int, now: float) -> tuple[bool, float, int]:
        """Count one request at `now` if the window has room, then read the window: (acquired, oldest, count)."""
        acquired = self._acquire(key, limit, expiry, 1, now)
        oldest, count = await self.get_moving_window(key, limit, expiry)
        return acquired, oldest, count

    async def forget_entry(self, key: str, at: float) -> None:
        """Take back one request counted at `at` (nothing if the window does not hold it)."""
        with self._lock:
            window = self._windows.get(key)
            if window is not None and at in window:
                window.remove(at)

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = self.clock()
        with self._lock:
            window = self._windows.get(key, [])
            # Newest first: the counted entries are a prefix, found by bisection (a window can hold
            # a whole hour of an enterprise user's requests; scanning it cost O(limit) per hit).
            count = bisect.bisect_right(window, expiry - now, hi=min(limit, len(window)), key=operator.neg)
            oldest = window[count - 1] if count else now
        return oldest, count

    async def clear(self, key: str) -> None:
        with self._lock:
            self._windows.pop(key, None)

    async def reset(self) -> int | None:
        with self._lock:
            count = len(self._windows)
            self._windows.clear()
        return count

    def _sweep(self, now: float, expiry: int) -> None:
        for key in [k for k, window in self._windows.items() if not window or window[0] < now - expiry]:
            del self._windows[key]


class _ClockedRedisStorage(RedisStorage):
    """`limits`' Redis storage (redis-py client) whose moving-window scripts get their timestamp from `clock`.

    One per event loop. Its commands hold one of the client's command slots each
    (`chatservice.redis_bounds`), and the hits of concurrent requests go to Redis together: one
    pipeline of scripts per batch (`chatservice.batches`), one round trip for a burst.
    """

    def __init__(self, uri: str, *, clock: Clock, key_prefix: str) -> None:
        # Fail fast and let the limiter degrade: no backoff, one retry for a stale pooled connection;
        # a slow answer is bounded by RequestLimiter._run (chatservice.redis_bounds).
        options: dict[str, Any] = {**CLIENT_OPTIONS, "retry": Retry(NoBackoff(), 1)}
        super().__init__(uri, implementation="redispy", key_prefix=key_prefix, **options)
        self.clock = clock
        self.slots = command_slots()
        self._acquire_and_window: AsyncScript | None = None
        self._hits: Batches[tuple[str, float, int, int], tuple[bool, float, int]] = Batches(
            self._send_hits, on_abandoned=self._forget_abandoned
        )

    @property
    def _redispy(self) -> RedispyBridge:
        return cast(RedispyBridge, self.bridge)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        bridge = self._redispy
        async with self.slots:
            acquired = await bridge.lua_acquire_moving_window(
                [bridge.prefixed_key(key)], [self.clock(), limit, expiry, amount]
            )
        return bool(acquired)

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        bridge = self._redispy
        now = self.clock()
        async with self.slots:
            window = await bridge.lua_moving_window([bridge.prefixed_key(key)], [now - expiry, limit])
        if window:
            return float(window[0]), int(window[1])
        return now, 0

    async def clear(self, key: str) -> None:
        async with self.slots:
            await super().clear(key)

    async def acquire_and_window(self, key: str, limit: int, expiry: int, now: float) -> tuple[bool, float, int]:
        """`acquire_entry` at `now` then `get_moving_window` in one script, sent with the other requests' hits."""
        return await self._hits.submit((key, now, limit, expiry))

    async def forget_entry(self, key: str, at: float) -> None:
        """Take back one request counted at `at` (nothing if the window does not hold it). The script
        pushed the timestamp as redis-py encodes a float, its `repr`, which LREM is given to match."""
        bridge = self._redispy
        async with self.slots:
            await cast(Redis, bridge.get_connection()).lrem(bridge.prefixed_key(key), 1, repr(at))

    async def _forget_abandoned(self, hit: tuple[str, float, int, int], result: tuple[bool, float, int] | None) -> None:
        """A hit whose caller left while it was on its way (its admission cancelled, or its wait for
        Redis timed out and the request was counted per process): taken back if it counted, or if it
        may have (`result` unknown: the send was interrupted). Within the same bound as a hit; if
        Redis fails meanwhile the hit stays counted there, which only makes the limit stricter."""
        if result is not None and not result[0]:
            return
        key, now, _, _ = hit
        with contextlib.suppress(*REDIS_ERRORS):
            async with redis_deadline():
                await self.forget_entry(key, now)

    async def _send_hits(
        self, hits: Sequence[tuple[str, float, int, int]]
    ) -> list[tuple[bool, float, int] | BaseException]:
        """One pipeline (no MULTI) of the acquire-and-window script, one run per hit, in order."""
        bridge = self._redispy
        client = cast(Redis, bridge.get_connection())
        script = self._acquire_and_window
        if script is None:
            script = self._acquire_and_window = client.register_script(_ACQUIRE_AND_WINDOW)
        keys = [bridge.prefixed_key(key) for key, _, _, _ in hits]
        # Bounded as each caller's wait is (RequestLimiter._run): a batch on a connection that hung
        # must end, or it would hold its slot and its place among the batches in flight for good.
        async with redis_deadline(), self.slots:
            if len(hits) == 1:  # alone: the script object sends it (and loads the script if Redis lost it)
                _, now, limit, expiry = hits[0]
                replies = [await script(keys, [now, limit, expiry])]
            else:
                replies = await self._pipeline(client, script, keys, hits)
                if any(isinstance(reply, NoScriptError) for reply in replies):  # Redis restarted or lost its scripts
                    await client.script_load(_ACQUIRE_AND_WINDOW)
                    replies = await self._pipeline(client, script, keys, hits)  # a NOSCRIPT reply ran nothing
        results: list[tuple[bool, float, int] | BaseException] = []
        for (_, now, _, _), reply in zip(hits, replies, strict=True):
            if isinstance(reply, BaseException):
                results.append(reply)
            else:
                acquired, oldest, count = reply
                results.append((bool(acquired), float(oldest) if int(count) else now, int(count)))
        return results

    @staticmethod
    async def _pipeline(
        client: Redis, script: AsyncScript, keys: list[str], hits: Sequence[tuple[str, float, int, int]]
    ) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for key, (_, now, limit, expiry) in zip(keys, hits, strict=True):
            pipe.evalsha(script.sha, 1, key, now, limit, expiry)
        return await pipe.execute(raise_on_error=False)

    async def aclose(self) -> None:
        await self._redispy.storage.aclose()


def _storage_uri(redis_url: str) -> str:
    """REDIS_URL in the form `limits` expects (`async+redis://…`)."""
    if redis_url.startswith("unix://"):
        return "async+redis+unix://" + redis_url.removeprefix("unix://")
    return redis_url if redis_url.startswith("async+") else f"async+{redis_url}"


def _whole_seconds_after(instant: float, now: float) -> int:
    """The fewest whole seconds to wait until strictly after `instant` (the window's edge is inclusive)."""
    return max(0, math.floor(instant - now) + 1)


class RequestLimiter:
    """Hourly request windows keyed by user: shared in Redis when `redis_url` is set, in this process otherwise.

    `clock` (seconds, float) is an attribute so tests can move time; `probe_interval` is how long a
    Redis outage keeps requests on the per-process window before Redis is tried again.
    """

    def __init__(
        self,
        *,
        redis_url: str = "",
        key_prefix: str = "chat:rph",
        window_seconds: int = WINDOW_SECONDS,
        clock: Clock = time.time,
        probe_interval: float = PROBE_INTERVAL_SECONDS,
    ) -> None:
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.window_seconds = window_seconds
        self.clock = clock
        self.probe_interval = probe_interval
        self._local = MovingWindowRateLimiter(_ClockedMemoryStorage(clock=self._now))
        # redis.asyncio connections belong to one event loop: one client per loop.
        self._shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MovingWindowRateLimiter] = (
            weakref.WeakKeyDictionary()
        )
        self._state_lock = threading.Lock()
        self._redis_down = False
        self._next_probe = 0.0

    @property
    def degraded(self) -> bool:
        """True while Redis is configured but unreachable (requests use the per-process window)."""
        return self._redis_down

    async def hit(self, *, user_id: int, limit: int) -> LimitState:
        """Count one request for `user_id` if the window has room; a refused request is not counted."""
        if limit <= 0:
            return LimitState(limit=0, used=0, remaining=0, reset_seconds=self.window_seconds, allowed=False)
        item = _UserWindow(limit, self.window_seconds, namespace="requests")

        async def on(strategy: MovingWindowRateLimiter) -> LimitState:
            storage = cast(_ClockedMemoryStorage | _ClockedRedisStorage, strategy.storage)
            now = self.clock()
            allowed, oldest, count = await storage.acquire_and_window(
                item.key_for("user", str(user_id)), item.amount, item.get_expiry(), now
            )
            return self._limit_state(
                item, oldest + item.get_expiry(), count, allowed=allowed, counted_at=now if allowed else None
            )

        return await self._run(on)

    async def unhit(self, *, user_id: int, state: LimitState) -> None:
        """Take back the request `hit` counted in `state` (admitted hourly, then refused by something
        else): it no longer counts in the window. Nothing when `state` counted nothing.

        It is taken from wherever the window is kept now: a hit counted per process during a Redis
        outage that ended meanwhile stays counted there, which only makes the limit stricter.
        """
        at = state.counted_at
        if at is None:
            return
        key = _UserWindow(1, self.window_seconds, namespace="requests").key_for("user", str(user_id))

        async def on(strategy: MovingWindowRateLimiter) -> None:
            await cast(_ClockedMemoryStorage | _ClockedRedisStorage, strategy.storage).forget_entry(key, at)

        await self._run(on)

    async def peek(self, *, user_id: int, limit: int) -> LimitState:
        """The window as it stands, counting nothing (for `/usage`)."""
        if limit <= 0:
            return LimitState(limit=0, used=0, remaining=0, reset_seconds=0, allowed=False)
        item = _UserWindow(limit, self.window_seconds, namespace="requests")

        async def on(strategy: MovingWindowRateLimiter) -> LimitState:
            return await self._state(strategy, item, user_id, allowed=None)

        return await self._run(on)

    async def clear(self, *, user_id: int) -> None:
        """Forget a user's window (operators; tests), wherever it is kept."""
        item = _UserWindow(1, self.window_seconds, namespace="requests")

        async def on(strategy: MovingWindowRateLimiter) -> None:
            await strategy.clear(item, "user", str(user_id))

        await self._run(on)
        await self._local.clear(item, "user", str(user_id))

    async def aclose(self) -> None:
        """Close this event loop's Redis connections."""
        strategy = self._shared.pop(asyncio.get_running_loop(), None)
        if strategy is not None:
            await cast(_ClockedRedisStorage, strategy.storage).aclose()

    def _now(self) -> float:
        return self.clock()

    async def _state(
        self, strategy: MovingWindowRateLimiter, item: _UserWindow, user_id: int, *, allowed: bool | None
    ) -> LimitState:
        stats = await strategy.get_window_stats(item, "user", str(user_id))
        return self._limit_state(item, stats.reset_time, item.amount - stats.remaining, allowed=allowed)

    def _limit_state(
        self, item: _UserWindow, reset_time: float, count: int, *, allowed: bool | None, counted_at: float | None = None
    ) -> LimitState:
        """The state of a window holding `count` requests whose oldest leaves it at `reset_time`."""
        limit = item.amount
        remaining = max(0, min(limit, limit - count))
        used = limit - remaining
        reset = _whole_seconds_after(reset_time, self.clock()) if used else 0
        return LimitState(
            limit=limit,
            used=used,
            remaining=remaining,
            reset_seconds=reset,
            allowed=remaining > 0 if allowed is None else allowed,
            counted_at=counted_at,
        )

    async def _run(self, operation: Callable[[MovingWindowRateLimiter], Awaitable[T]]) -> T:
        """Run on Redis when it is configured and reachable, else on this process's window.

        A request whose Redis write landed just before Redis failed may be counted in both windows:
        the outage can only make the limit stricter, never looser.
        """
        shared = self._shared_strategy()
        if shared is not None:
            try:
                async with redis_deadline():
                    result = await operation(shared)
            except REDIS_ERRORS as exc:
                self._mark_down(exc)
            else:
                self._mark_up()
                return result
        return await operation(self._local)

    def _shared_strategy(self) -> MovingWindowRateLimiter | None:
        if not self.redis_url or (self._redis_down and time.monotonic() < self._next_probe):
            return None
        loop = asyncio.get_running_loop()
        strategy = self._shared.get(loop)
        if strategy is None:
            storage = _ClockedRedisStorage(_storage_uri(self.redis_url), clock=self._now, key_prefix=self.key_prefix)
            strategy = self._shared[loop] = MovingWindowRateLimiter(storage)
        return strategy

    def _mark_down(self, exc: BaseException) -> None:
        with self._state_lock:
            self._next_probe = time.monotonic() + self.probe_interval
            if self._redis_down:
                return
            self._redis_down = True
        logger.warning(
            "redis unreachable for the request limiter (%s: %s); requests per hour are limited per process",
            type(exc).__name__,
            exc,
        )

    def _mark_up(self) -> None:
        with self._state_lock:
            if not self._redis_down:
                return
            self._redis_down = False
        logger.info("redis is reachable again; requests per hour are limited across processes again")


class _ProcessLimiter:
    """The process's limiter, built from settings on first use and rebuilt if REDIS_URL changes."""

    def __init__(self) -> None:
        self._limiter: RequestLimiter | None = None
        self._lock = threading.Lock()

    def get(self) -> RequestLimiter:
        redis_url = str(getattr(settings, "REDIS_URL", "") or "")
        prefix = str(getattr(settings, "RATE_LIMIT_NAMESPACE", "chat")) + ":rph"
        with self._lock:
            current = self._limiter
            if current is None or current.redis_url != redis_url or current.key_prefix != prefix:
                current = self._limiter = RequestLimiter(redis_url=redis_url, key_prefix=prefix)
            return current


_process_limiter = _ProcessLimiter()


def request_limiter() -> RequestLimiter:
    """The limiter `limit_hit` and `limit_peek` use unless given one."""
    return _process_limiter.get()


async def limit_hit(principal: Principal, *, limiter: RequestLimiter | None = None) -> LimitState:
    """Count one request against the principal's hourly limit, if it fits; a refused one is not counted."""
    return await (limiter or request_limiter()).hit(user_id=principal.user_id, limit=principal.requests_per_hour)


async def limit_peek(principal: Principal, *, limiter: RequestLimiter | None = None) -> LimitState:
    """The principal's hourly window as it stands, counting nothing."""
    return await (limiter or request_limiter()).peek(user_id=principal.user_id, limit=principal.requests_per_hour)
