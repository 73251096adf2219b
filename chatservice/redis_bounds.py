"""How long one operation on Redis may take, and which exceptions mean Redis failed.

Every Redis user in the service (the request limiter, the circuit breaker, the provider status)
degrades to per-process state when Redis fails. A slow Redis is bounded per operation with
`asyncio.timeout(REDIS_TIMEOUT_SECONDS)` rather than redis-py's `socket_timeout`, which wraps
every command's write in `asyncio.wait_for`: a task per command, a fifth of a command's CPU.
redis-py 8 sets a `socket_timeout` of 5 s when none is given, so the clients are built with
CLIENT_OPTIONS, which turn it off explicitly.

The bound is `redis_deadline()`: REDIS_TIMEOUT_SECONDS of the event loop's own time, plus the time
the loop spent behind its timers meanwhile (busy with other callbacks, or its process not scheduled).
A loop that is late to read an answer Redis sent in time is not a Redis that hangs: a plain wall
clock bound read a loaded process as "Redis is down", sent it to its per-process windows and let
every replica admit a whole limit of its own. The lag excused is capped (MAX_LAG_EXCUSED_SECONDS),
so a Redis that hangs under a loaded loop is still given up on.

A redis.asyncio connection pool holds at most `max_connections` connections (redis-py 8: 100 by
default) and raises MaxConnectionsError, a ConnectionError, for the next command: a burst of
more concurrent operations than that would read as "Redis is down" and send every Redis user to
its per-process fallback. Each client is therefore paired with `command_slots()`: at most
MAX_CONNECTIONS operations at once per client and event loop, the rest wait their turn (within
the same per-operation timeout), so a burst opens a bounded number of connections and none fails.
"""

from __future__ import annotations

import asyncio
import weakref
from types import TracebackType
from typing import Any

from redis.exceptions import RedisError

REDIS_TIMEOUT_SECONDS = 1.0
MAX_LAG_EXCUSED_SECONDS = 4.0  # at most this much event-loop lag is added to one operation's bound
LAG_TICK_SECONDS = 0.05  # while a deadline is open, how often the loop's lag is sampled
REDIS_CONNECT_TIMEOUT_SECONDS = 0.5
MAX_CONNECTIONS = 16  # per client and event loop: operations beyond it wait for a free one
# For every redis.asyncio client the service builds: connecting is bounded, each command is not
# (the caller's asyncio.timeout bounds the whole operation).
CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_SECONDS,
    "socket_timeout": None,
    "max_connections": MAX_CONNECTIONS,
}
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


def command_slots() -> asyncio.Semaphore:
    """The slots of one client on one event loop: hold one around each operation (one connection)."""
    return asyncio.Semaphore(MAX_CONNECTIONS)


class _LoopLag:
    """How far one event loop has run behind its timers, summed while any Redis deadline is open.

    A timer fires late only when the loop is busy running other callbacks or its process is not
    scheduled, so the lateness of a timer re-armed every LAG_TICK_SECONDS is the time the loop could
    not have read an answer. The timer runs only while a deadline is open.
    """

    __slots__ = ("_due", "_loop", "_open", "behind")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.behind = 0.0  # seconds the loop has been late, in total
        self._open = 0
        self._due: float | None = None

    def open(self) -> float:
        """One more deadline open; returns the lag so far."""
        self._open += 1
        if self._due is None:
            self._arm(self._loop.time())
        else:
            self.account(self._loop.time())
        return self.behind

    def close(self) -> None:
        self._open -= 1

    def account(self, now: float) -> None:
        """Count the lateness of the pending sample up to `now`."""
        if self._due is not None and now > self._due:
            self.behind += now - self._due
            self._due = now

    def _arm(self, now: float) -> None:
        self._due = now + LAG_TICK_SECONDS
        self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        self.account(now)
        if self._open > 0:
            self._arm(now)
        else:
            self._due = None


_lags: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopLag] = weakref.WeakKeyDictionary()


def redis_deadline(seconds: float = REDIS_TIMEOUT_SECONDS) -> RedisDeadline:
    """`async with redis_deadline():` bounds one Redis operation, as `asyncio.timeout` would (see RedisDeadline)."""
    return RedisDeadline(seconds)


class RedisDeadline:
    """Bound one Redis operation: TimeoutError after `seconds` of the loop's time, not counting the
    time the loop ran behind meanwhile (up to MAX_LAG_EXCUSED_SECONDS; see the module's docstring)."""

    __slots__ = ("_handle", "_lag", "_seconds", "_since", "_started", "_timeout")

    def __init__(self, seconds: float = REDIS_TIMEOUT_SECONDS) -> None:
        self._seconds = seconds

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        lag = _lags.get(loop)
        if lag is None:
            lag = _lags[loop] = _LoopLag(loop)
        self._lag = lag
        self._since = lag.open()
        self._timeout = asyncio.timeout(None)
        await self._timeout.__aenter__()
        self._started = loop.time()
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._started + self._seconds, self._check)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._lag.account(now)
        excused = min(self._lag.behind - self._since, MAX_LAG_EXCUSED_SECONDS)
        ends = self._started + self._seconds + excused
        if now >= ends:
            self._handle = None
            self._timeout.reschedule(now)  # expires: the operation is cancelled, TimeoutError on exit
        else:
            self._handle = loop.call_at(ends, self._check)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._lag.close()
        await self._timeout.__aexit__(exc_type, exc, tb)  # raises TimeoutError when it expired
