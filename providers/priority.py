"""The priority lane: a per-provider bound on in-flight upstream calls, waiters served by plan priority.

At most MAX_INFLIGHT_PER_PROVIDER calls per provider run at once in a process. When a
provider is saturated, a freed slot goes to the waiter with the highest priority (FIFO among
equals); a waiter that outlives its wait gets `ProviderSaturated`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from django.conf import settings

from providers.base import ProviderSaturated

SATURATED_RETRY_AFTER_SECONDS = 1.0


def _limit() -> int:
    return max(1, int(settings.MAX_INFLIGHT_PER_PROVIDER))


def _granted(future: asyncio.Future[None]) -> bool:
    return future.done() and not future.cancelled()


class _ProviderLane:
    """In-flight count and priority-ordered waiters of one provider on one event loop."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.inflight = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, f in self._waiters if not f.done())

    async def acquire(self, priority: int, max_wait: float) -> None:
        if self.inflight < _limit() and self.waiting == 0:
            self.inflight += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._order), future))
        try:
            async with asyncio.timeout(max(0.0, max_wait)):
                await future
        except TimeoutError:
            if _granted(future):  # handed a slot just as the wait ran out: keep it
                return
            future.cancel()
            raise ProviderSaturated(
                self.provider,
                f"{self.inflight} calls in flight; no slot freed within {max_wait:.1f} s",
                retry_after=SATURATED_RETRY_AFTER_SECONDS,
            ) from None
        except BaseException:
            if _granted(future):  # cancelled after a slot was handed over: pass it on
                self.release()
            else:
                future.cancel()
            raise

    def release(self) -> None:
        """Hand the slot to the best waiter, or free it."""
        if self.inflight <= _limit():
            while self._waiters:
                _, _, future = heapq.heappop(self._waiters)
                if not future.done():
                    future.set_result(None)  # the slot changes hands; inflight is unchanged
                    return
        self.inflight -= 1


class PriorityLane:
    """Slots per provider, kept per event loop (a loop's futures cannot be awaited from another)."""

    def __init__(self) -> None:
        self._lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _ProviderLane]] = (
            weakref.WeakKeyDictionary()
        )

    def _lane(self, provider: str) -> _ProviderLane:
        lanes = self._lanes.setdefault(asyncio.get_running_loop(), {})
        if provider not in lanes:
            lanes[provider] = _ProviderLane(provider)
        return lanes[provider]

    @asynccontextmanager
    async def slot(self, provider: str, *, priority: int, max_wait: float) -> AsyncIterator[None]:
        """Hold one of `provider`'s slots for the body; wait at most `max_wait` s for it."""
        lane = self._lane(provider)
        await lane.acquire(priority, max_wait)
        try:
            yield
        finally:
            lane.release()

    def inflight(self, provider: str) -> int:
        return self._lane(provider).inflight

    def waiting(self, provider: str) -> int:
        return self._lane(provider).waiting
