"""A value read from the database and kept for a few seconds, re-read by one caller at a time.

The catalog and the content rules are read on every request and change only when an operator
edits them, so each request takes them from memory and they are re-read when older than their
`ttl`. One re-read at a time: while it runs, the callers that find the value stale are served
the value in hand (they neither queue behind it nor re-read in parallel, which a burst of
requests would otherwise do); only a first read, or one after `invalidate()`, is waited for.
A re-read that fails keeps the value in hand for another period (and is logged).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from chatservice.db import db_async

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ReReadCache(Generic[T]):
    """`loader` (sync: it may query the database) re-read when the value is older than `ttl` seconds."""

    def __init__(self, loader: Callable[[], T], *, ttl: float, what: str, clock: Callable[[], float] = time.monotonic):
        self.loader = loader
        self.ttl = ttl
        self.what = what
        self.clock = clock
        self._value: T | None = None
        self._loaded_at = 0.0
        self._reload = threading.Lock()

    def fresh(self) -> T | None:
        """The value if it is fresh, None if it is due for a re-read; never reads the database.

        One look at the clock: the async path must not decide "fresh" and then read the value
        with `get()`, which may find it stale a moment later and query from the event loop.
        """
        value = self._value
        return value if value is not None and self.clock() - self._loaded_at <= self.ttl else None

    def stale(self) -> T | None:
        """The value in hand however old (None before the first read)."""
        return self._value

    @property
    def reloading(self) -> bool:
        return self._reload.locked()

    def get(self) -> T:
        """The value, re-read first when it is stale (sync: it may query the database)."""
        value = self.fresh()
        return value if value is not None else self.load()

    async def aget(self) -> T:
        """The value from the event loop: fresh, or the one in hand while another caller re-reads
        it, or else re-read on the database's thread pool."""
        value = self.fresh()
        if value is not None:
            return value
        in_hand = self._value
        if in_hand is not None and self.reloading:
            return in_hand
        return await db_async(self.load)()

    def load(self) -> T:
        """Re-read the value. When another thread is already re-reading it, return the value in hand
        at once (or, before the first read, wait for that one)."""
        in_hand = self._value
        if not self._reload.acquire(blocking=in_hand is None):
            return in_hand  # type: ignore[return-value]  # acquire only fails when not blocking
        try:
            if in_hand is None and (fresh := self.fresh()) is not None:
                return fresh  # the read we waited for
            try:
                value = self.loader()
            except Exception:
                if self._value is None:
                    raise
                logger.exception("re-reading the %s failed; keeping the one in hand", self.what)
                value = self._value
            self._value, self._loaded_at = value, self.clock()
            return value
        finally:
            self._reload.release()

    def invalidate(self) -> None:
        """Make the next caller re-read the value (and wait for it)."""
        self._value = None
