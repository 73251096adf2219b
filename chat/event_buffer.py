"""The bounded buffer between a run's producer and its one consumer.

What `asyncio.Queue` does for any number of producers and consumers, for exactly one of each,
in a fraction of the memory: a Queue holds three deques (~2.3 KB even when empty), and a
gateway holding 500 open streams holds 500 buffers.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class EventBuffer(Generic[T]):
    """At most `maxsize` items from one producer (`put`, `put_nowait`, `close`) to one consumer (`get`)."""

    __slots__ = ("_closed", "_getter", "_items", "_maxsize", "_putter")

    def __init__(self, maxsize: int) -> None:
        if maxsize <= 0:
            raise ValueError("maxsize must be > 0")
        self._items: list[T] = []
        self._maxsize = maxsize
        self._getter: asyncio.Future[None] | None = None  # the consumer, waiting for an item
        self._putter: asyncio.Future[None] | None = None  # the producer, waiting for room
        self._closed = False  # the producer is done: no more items will come

    def full(self) -> bool:
        return len(self._items) >= self._maxsize

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item: T) -> None:
        """Add `item`, or raise asyncio.QueueFull."""
        if self.full():
            raise asyncio.QueueFull
        self._items.append(item)
        _wake(self._getter)

    async def put(self, item: T) -> None:
        """Add `item` once there is room."""
        while self.full():
            self._putter = asyncio.get_running_loop().create_future()
            try:
                await self._putter
            finally:
                self._putter = None
        self.put_nowait(item)

    def close(self) -> None:
        """End the stream: once the items already in are taken, `get` returns None.

        Takes no room, so it never waits and never fails: a full buffer (a client that stopped
        reading) still ends, where a None put in as an item would find no room and be lost.
        """
        self._closed = True
        _wake(self._getter)

    async def get(self) -> T | None:
        """The oldest item, once there is one; None once the buffer is closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        item = self._items.pop(0)  # a few items at most: cheaper than a deque's 760-byte block
        _wake(self._putter)
        return item


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
