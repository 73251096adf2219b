"""Concurrent runs of one statement, sent to Postgres together: one round trip and one commit.

A caller asks for one run (`fetchone(params)`) and gets that run's first row, as from
`statements.fetchone`; the runs asked for while a batch is on its way go together as the next
one (`chatservice.batches`), through `statements.fetchone_each`: in one transaction, as one
pipeline. Besides the round trips, this spares statements that update one hot row (a user's
quota for the day) from waiting for each other's locks and commits one at a time.

A run's outcome is its own: a batch that fails for anything but a lost connection is run again
one statement at a time, so one bad run (a constraint it violates) fails alone. A caller that
is cancelled while its run is on the way does not see the row; `on_abandoned` is given the
run's parameters and row (None when unknown: the run was cancelled mid-statement, and has ended
one way or the other), to undo what it did.

`lock_order` gives the key of the row a run locks (a user's quota row for the day): a batch runs
in that order (as the runs came, without it), so two batches in flight at once lock their rows
in the same order and never wait for each other in a cycle. Unordered, two batches of several
users' requests deadlocked, and Postgres broke the cycle only after `deadlock_timeout` (1 s),
failing one batch to be run again one statement at a time (seen with 64 users' requests in the
benchmark).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from django.db import InterfaceError, OperationalError

from chatservice.async_db import statements
from chatservice.batches import MAX_IN_FLIGHT, Batches

logger = logging.getLogger(__name__)

Params = Mapping[str, Any]
Row = tuple[Any, ...] | None


class StatementBatches:
    """Batches of runs of `sql` (see the module's docstring)."""

    def __init__(
        self,
        sql: str,
        *,
        synchronous_commit: bool = True,
        on_abandoned: Callable[[Params, Row | None], Awaitable[None]] | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        lock_order: Callable[[Params], Any] | None = None,
    ) -> None:
        self.sql = sql
        self.synchronous_commit = synchronous_commit
        self.lock_order = lock_order
        self._batches: Batches[Params, Row] = Batches(
            self._send, on_abandoned=on_abandoned, max_in_flight=max_in_flight
        )

    async def fetchone(self, params: Params) -> Row:
        """Run the statement with `params` (in the next batch) and return its first row, if any."""
        return await self._batches.submit(params)

    async def drained(self) -> None:
        """Wait until this loop has no run on its way and no abandoned run being undone."""
        await self._batches.drained()

    async def _send(self, batch: Sequence[Params]) -> Sequence[Row | BaseException]:
        order = self._order(batch)
        try:
            rows = await statements.fetchone_each(
                self.sql, [batch[i] for i in order], synchronous_commit=self.synchronous_commit
            )
        except (OperationalError, InterfaceError):  # the connection or the database: every run failed
            raise
        except Exception:
            if len(batch) == 1:
                raise
        else:
            in_order: list[Row | BaseException] = [None] * len(batch)
            for position, i in enumerate(order):
                in_order[i] = rows[position]
            return in_order
        logger.info("a batch of %d runs failed; running them one at a time", len(batch))
        results: list[Row | BaseException] = []
        for params in batch:
            try:
                results.append(await statements.fetchone(self.sql, params, synchronous_commit=self.synchronous_commit))
            except Exception as exc:  # its own error; the others go on
                results.append(exc)
        return results

    def _order(self, batch: Sequence[Params]) -> list[int]:
        """The runs' positions in the order they lock their rows (as they came, without `lock_order`)."""
        lock_order = self.lock_order
        if lock_order is None or len(batch) == 1:
            return list(range(len(batch)))
        return sorted(range(len(batch)), key=lambda i: lock_order(batch[i]))
