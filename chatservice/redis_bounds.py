"""How long one operation on Redis may take, and which exceptions mean Redis failed.

Every Redis user in the service (the request limiter, the circuit breaker, the provider status)
degrades to per-process state when Redis fails. A slow Redis is bounded per operation with
`asyncio.timeout(REDIS_TIMEOUT_SECONDS)` rather than redis-py's `socket_timeout`, which wraps
every command's write in `asyncio.wait_for`: a task per command, a fifth of a command's CPU.
redis-py 8 sets a `socket_timeout` of 5 s when none is given, so the clients are built with
CLIENT_OPTIONS, which turn it off explicitly.

A redis.asyncio connection pool holds at most `max_connections` connections (redis-py 8: 100 by
default) and raises MaxConnectionsError, a ConnectionError, for the next command: a burst of
more concurrent operations than that would read as "Redis is down" and send every Redis user to
its per-process fallback. Each client is therefore paired with `command_slots()`: at most
MAX_CONNECTIONS operations at once per client and event loop, the rest wait their turn (within
the same per-operation timeout), so a burst opens a bounded number of connections and none fails.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import RedisError

REDIS_TIMEOUT_SECONDS = 1.0
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
