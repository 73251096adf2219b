"""How long one operation on Redis may take, and which exceptions mean Redis failed.

Every Redis user in the service (the request limiter, the circuit breaker, the provider status)
degrades to per-process state when Redis fails. A slow Redis is bounded per operation with
`asyncio.timeout(REDIS_TIMEOUT_SECONDS)` rather than redis-py's `socket_timeout`, which wraps
every command's write in `asyncio.wait_for`: a task per command, a fifth of a command's CPU.
"""

from __future__ import annotations

from redis.exceptions import RedisError

REDIS_TIMEOUT_SECONDS = 1.0
REDIS_CONNECT_TIMEOUT_SECONDS = 0.5
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
