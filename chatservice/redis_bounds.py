"""How long one operation on Redis may take, and which exceptions mean Redis failed.

Every Redis user in the service (the request limiter, the circuit breaker, the provider status)
degrades to per-process state when Redis fails. A slow Redis is bounded per operation with
`asyncio.timeout(REDIS_TIMEOUT_SECONDS)` rather than redis-py's `socket_timeout`, which wraps
every command's write in `asyncio.wait_for`: a task per command, a fifth of a command's CPU.
redis-py 8 sets a `socket_timeout` of 5 s when none is given, so the clients are built with
CLIENT_OPTIONS, which turn it off explicitly.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import RedisError

REDIS_TIMEOUT_SECONDS = 1.0
REDIS_CONNECT_TIMEOUT_SECONDS = 0.5
# For every redis.asyncio client the service builds: connecting is bounded, each command is not
# (the caller's asyncio.timeout bounds the whole operation).
CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_SECONDS,
    "socket_timeout": None,
}
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
