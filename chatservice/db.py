"""Running sync ORM code from the async request path, with connection hygiene.

Calls run on a thread pool (not Django's single thread-sensitive thread), so database work of
concurrent requests proceeds in parallel. Each call is bracketed by `close_old_connections`,
which honours CONN_MAX_AGE and CONN_HEALTH_CHECKS: a pooled thread keeps a healthy connection
between calls, never an open transaction, and drops a broken or expired one.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

P = ParamSpec("P")
R = TypeVar("R")


def db_async(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """`await db_async(fn)(...)` runs `fn` on the database thread pool."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return sync_to_async(call, thread_sensitive=False)
