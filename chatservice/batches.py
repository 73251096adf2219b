"""Concurrent calls of one operation on one event loop, sent on together as batches.

A caller submits one item and gets that item's result. Up to `max_in_flight` sends per event
loop are on their way at once: while fewer are and nothing waits, an item is sent at once, alone,
by its own caller (no hop to a sender task and back, which costs a turn of a busy event loop each
way). The items submitted while all are out wait, and go together as the next batch when one
comes back, so batches are as large as the traffic makes them: none when requests come one by
one, hundreds when a burst comes at once.

Why: under load an event loop takes a while to come back to each finished round trip, so a
pool of N connections serves at most N round trips per loop turn; a burst of 500 requests spent
hundreds of milliseconds queued for a connection, one statement or one Redis script at a time.
Batched, the same burst takes a few round trips (bench/README.md).

`send` gets the items of a batch and returns one result per item, in order; a result that is
an exception is raised to that item's caller alone. If `send` raises, every caller of the batch
gets the exception. A caller that leaves (is cancelled) while its item is on its way does not
see the result; `on_abandoned` gets the item and its result, to undo what it did: the result is
None when the caller was sending the item itself, and `send` stopped (for a Postgres statement:
`chatservice.async_db` cancels it on the server and waits for it to end, so it has either
committed or not).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

MAX_BATCH = 256  # items per batch; more wait for the next one
MAX_IN_FLIGHT = 4  # sends (single items or batches) on their way at once per event loop


class Batches(Generic[Item, Result]):
    """Batches of `send` calls, per event loop (see the module's docstring)."""

    def __init__(
        self,
        send: Callable[[Sequence[Item]], Awaitable[Sequence[Result | BaseException]]],
        *,
        on_abandoned: Callable[[Item, Result | None], Awaitable[None]] | None = None,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.send = send
        self.on_abandoned = on_abandoned
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopBatches[Item, Result]] = (
            weakref.WeakKeyDictionary()
        )

    async def submit(self, item: Item) -> Result:
        """`item`'s result, from the next batch."""
        loop = asyncio.get_running_loop()
        batches = self._loops.get(loop)
        if batches is None:
            batches = self._loops[loop] = _LoopBatches(self)
        return await batches.submit(loop, item)

    async def drained(self) -> None:
        """Wait until this loop has no batch on its way and no abandoned item being undone."""
        batches = self._loops.get(asyncio.get_running_loop())
        while batches is not None and batches.busy:
            await asyncio.gather(*batches.busy, return_exceptions=True)


class _LoopBatches(Generic[Item, Result]):
    def __init__(self, owner: Batches[Item, Result]) -> None:
        self.owner = owner
        self.pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self.senders = 0
        self.busy: set[asyncio.Task[None]] = set()  # the senders and the undoing of abandoned items

    async def submit(self, loop: asyncio.AbstractEventLoop, item: Item) -> Result:
        if self.senders < self.owner.max_in_flight and not self.pending:
            return await self._send_inline(loop, item)
        future: asyncio.Future[Result] = loop.create_future()
        self.pending.append((item, future))
        self._start_sender(loop)
        return await future

    def _start_sender(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.pending and self.senders < self.owner.max_in_flight:
            self.senders += 1
            self._track(loop.create_task(self._send()))

    async def _send_inline(self, loop: asyncio.AbstractEventLoop, item: Item) -> Result:
        """Send `item` alone from its caller's task: no hop to a sender task and back."""
        self.senders += 1
        try:
            (result,) = await self.owner.send([item])
        except asyncio.CancelledError:
            if self.owner.on_abandoned is not None:  # the send was interrupted: its result is unknown
                self._track(loop.create_task(self._undo(item, None)))
            raise
        finally:
            self.senders -= 1
            self._start_sender(loop)  # for what came meanwhile, if every sender is busy
        if isinstance(result, BaseException):
            raise result
        return result

    def _track(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        self.busy.add(task)
        task.add_done_callback(self.busy.discard)
        return task

    async def _send(self) -> None:
        try:
            while self.pending:
                size = self.owner.max_batch
                batch, self.pending = self.pending[:size], self.pending[size:]
                live = [(item, future) for item, future in batch if not future.cancelled()]
                if live:
                    await self._run(live)
        finally:
            self.senders -= 1
            if self.senders == 0:  # a sender ends with items pending only when cancelled (the loop is closing)
                for _, future in self.pending:
                    future.cancel()
                self.pending = []

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self.owner.send([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (item, future), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                if not future.done():
                    future.set_exception(result)
            elif not future.done():
                future.set_result(result)
            elif future.cancelled() and self.owner.on_abandoned is not None:
                self._track(asyncio.get_running_loop().create_task(self._undo(item, result)))

    async def _undo(self, item: Item, result: Result | None) -> None:
        assert self.owner.on_abandoned is not None
        try:
            await self.owner.on_abandoned(item, result)
        except Exception:
            logger.exception("could not undo an item whose caller left")
