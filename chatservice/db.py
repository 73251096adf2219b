"""Running sync ORM code from the async request path, with connection hygiene.

Calls run on a thread pool (not Django's single thread-sensitive thread), so database work of
concurrent requests proceeds in parallel. Each call is bracketed by `close_old_connections`,
which honours CONN_MAX_AGE and CONN_HEALTH_CHECKS: a pooled thread keeps a healthy connection
between calls, never an open transaction, and drops a broken or expired one.

The health check (a `SELECT 1` round trip) runs only on a connection that sat idle for
HEALTH_CHECK_IDLE_SECONDS or more: one used a moment ago is as good as checked, and checking
it before every call would double the round trips of the hot path. A connection that breaks
while busy fails its next statement, which marks it and gets it replaced at the end of that call.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection

P = ParamSpec("P")
R = TypeVar("R")

HEALTH_CHECK_IDLE_SECONDS = 1.0


def _before_call() -> None:
    close_old_connections()
    last_used: float = getattr(connection, "chat_last_used", 0.0)
    if connection.connection is not None and time.monotonic() - last_used < HEALTH_CHECK_IDLE_SECONDS:
        connection.health_check_done = True  # type: ignore[attr-defined]


def _after_call() -> None:
    connection.chat_last_used = time.monotonic()  # type: ignore[attr-defined]
    close_old_connections()


def db_async(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """`await db_async(fn)(...)` runs `fn` on the database thread pool."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        _before_call()
        try:
            return fn(*args, **kwargs)
        finally:
            _after_call()

    return sync_to_async(call, thread_sensitive=False)
