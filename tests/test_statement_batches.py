"""Concurrent runs of one statement go to Postgres together, and each run's outcome stays its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import asyncpg
import pytest
from django.db import DataError

from chatservice.async_db import statements
from chatservice.batches import MAX_IN_FLIGHT
from chatservice.statement_batches import StatementBatches

pytestmark = pytest.mark.django_db(transaction=True)

SLOW = "SELECT 100 / %(d)s::int FROM pg_sleep(%(s)s)"


class Sent:
    """Counts the batches `statements.fetchone_each` is given (a spy: the real call still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        real = statements.fetchone_each

        async def spy(sql: str, params: list, *, synchronous_commit: bool = True) -> list:
            self.sizes.append(len(params))
            return await real(sql, params, synchronous_commit=synchronous_commit)

        monkeypatch.setattr(statements, "fetchone_each", spy)


async def test_runs_asked_for_together_go_in_few_batches_and_each_gets_its_own_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent = Sent(monkeypatch)
    batches = StatementBatches("SELECT %(n)s::int * 2")
    rows = await asyncio.gather(*(batches.fetchone({"n": n}) for n in range(100)))
    assert rows == [(2 * n,) for n in range(100)]
    # The first few go at once, each alone; the rest wait for one of them and go together.
    assert sent.sizes[:MAX_IN_FLIGHT] == [1] * MAX_IN_FLIGHT and sum(sent.sizes) == 100
    assert len(sent.sizes) <= 2 * MAX_IN_FLIGHT


async def test_a_run_asked_for_alone_is_sent_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = Sent(monkeypatch)
    batches = StatementBatches("SELECT %(n)s::int + 1")
    assert await asyncio.wait_for(batches.fetchone({"n": 41}), timeout=5) == (42,)
    assert sent.sizes == [1]


async def test_a_run_that_fails_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = Sent(monkeypatch)
    batches = StatementBatches(SLOW, max_in_flight=1)
    first = asyncio.create_task(batches.fetchone({"d": 1, "s": 0.2}))  # on its way alone
    await asyncio.sleep(0.05)
    results = await asyncio.gather(
        *(batches.fetchone({"d": d, "s": 0}) for d in (1, 2, 0, 4, 5)), return_exceptions=True
    )
    assert await first == (100,)
    assert results[:2] == [(100,), (50,)] and results[3:] == [(25,), (20,)]
    assert isinstance(results[2], DataError)  # Django's error, as from every other statement
    with pytest.raises(DataError):
        await batches.fetchone({"d": 0, "s": 0})  # a run alone raises its own error too
    assert sent.sizes == [1, 5, 1]  # the batch of five failed as a whole, then ran one at a time


async def test_a_run_whose_caller_left_while_it_waited_in_a_batch_is_handed_back_with_its_row() -> None:
    abandoned: list[tuple[Mapping[str, Any], Any]] = []

    async def undo(params: Mapping[str, Any], row: Any) -> None:
        abandoned.append((dict(params), row))

    batches = StatementBatches(SLOW, on_abandoned=undo, max_in_flight=1)
    alone = asyncio.create_task(batches.fetchone({"d": 1, "s": 0.2}))
    await asyncio.sleep(0.05)
    leaving = asyncio.create_task(batches.fetchone({"d": 2, "s": 0.2}))
    staying = asyncio.create_task(batches.fetchone({"d": 4, "s": 0.2}))
    await asyncio.sleep(0.3)  # the first is done; the other two are on their way as one batch
    leaving.cancel()
    assert await alone == (100,) and await staying == (25,)
    await batches.drained()
    assert leaving.cancelled()
    assert abandoned == [({"d": 2, "s": 0.2}, (50,))]


async def test_a_run_whose_caller_left_while_sending_it_is_stopped_and_handed_back_unknown() -> None:
    abandoned: list[tuple[Mapping[str, Any], Any]] = []

    async def undo(params: Mapping[str, Any], row: Any) -> None:
        abandoned.append((dict(params), row))

    pid_row = await statements.fetchone("SELECT pg_backend_pid()", {})  # the idle connection the run will take
    assert pid_row is not None
    watcher = await asyncpg.connect(**statements._connection_params(statements.database)[0])
    batches = StatementBatches(SLOW, on_abandoned=undo)
    leaving = asyncio.create_task(batches.fetchone({"d": 1, "s": 5}))
    await asyncio.sleep(0.1)
    state = "SELECT state FROM pg_stat_activity WHERE pid = $1"
    assert await watcher.fetchval(state, pid_row[0]) == "active"
    started = time.monotonic()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert time.monotonic() - started < 2  # the statement was cancelled on the server, not waited for
    assert await watcher.fetchval(state, pid_row[0]) == "idle"  # and had ended when the cancellation went on
    await watcher.close()
    await batches.drained()
    assert abandoned == [({"d": 1, "s": 5}, None)]


async def test_batches_lock_their_rows_in_one_order_so_two_at_once_never_deadlock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two batches of runs on the same two rows, the runs given in opposite orders, both waiting
    for the rows and then let go at once: in the rows' order they queue; as given, each would hold
    one row and wait for the other's (a deadlock, broken only after `deadlock_timeout`)."""
    from datetime import date

    from channels.db import database_sync_to_async as sync_to_async

    from accounts.services import user_get_or_create
    from usage.models import DailyTokenUsage
    from usage.quotas import quota_row

    day = date(2031, 3, 14)

    def rows() -> list[int]:
        users = [user_get_or_create(username=f"lock-order-{n}", plan_name="premium")[0].pk for n in (1, 2)]
        for user_id in users:
            DailyTokenUsage.objects.create(user_id=user_id, day=day, used=0, reserved=0)
        return users

    first, second = await sync_to_async(rows)()
    touch = (
        "UPDATE usage_dailytokenusage SET reserved = reserved + 1 "
        "WHERE user_id = %(user_id)s AND day = %(day)s RETURNING user_id"
    )
    batches = StatementBatches(touch, lock_order=quota_row)
    alone: list[str] = []
    fetchone = statements.fetchone

    async def spy(sql: str, params: Mapping[str, Any], *, synchronous_commit: bool = True) -> Any:
        alone.append(sql)  # the one-at-a-time rerun of a failed batch
        return await fetchone(sql, params, synchronous_commit=synchronous_commit)

    monkeypatch.setattr(statements, "fetchone", spy)
    one, two = {"user_id": first, "day": day}, {"user_id": second, "day": day}
    async with statements._connection(True) as blocker, blocker.transaction():
        await blocker.execute("SELECT 1 FROM usage_dailytokenusage WHERE user_id IN ($1, $2) FOR UPDATE", first, second)
        # Two batches as the batching would send them, one row each first (their own connections).
        sends = [asyncio.ensure_future(batches._send(order)) for order in ([one, two], [two, one])]
        await asyncio.sleep(0.3)  # both are waiting for the blocked rows
        assert not any(send.done() for send in sends)
    forward, backward = await asyncio.wait_for(asyncio.gather(*sends), timeout=10)

    assert forward == [(first,), (second,)] and backward == [(second,), (first,)]  # each run its own row
    assert alone == []  # neither batch failed and was rerun
    reserved = await sync_to_async(lambda: sorted(DailyTokenUsage.objects.values_list("reserved", flat=True)))()
    assert reserved == [2, 2]
