"""`db_async`: pooled threads keep their connection, skip the health check right after a use, and
replace a connection that broke."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections
from django.db.backends.postgresql.base import DatabaseWrapper
from django.db.utils import OperationalError

from chatservice.db import db_async

pytestmark = pytest.mark.django_db(transaction=True)


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        row = cursor.fetchone()
    assert row is not None
    return int(row[0])


@sync_to_async(thread_sensitive=True)
def terminate(pid: int) -> None:
    """End the backend of another connection, as a Postgres restart or a proxy timeout would."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    finally:
        connection.close()


@pytest.fixture
async def one_thread(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """The loop's default executor (db_async's pool) reduced to one thread, so every call shares a
    connection, kept between calls as in production (the tests' default CONN_MAX_AGE is 0)."""
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 60)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(executor)
    yield
    await loop.run_in_executor(None, connections.close_all)
    executor.shutdown(wait=True)


@pytest.fixture
def health_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original: Callable[[DatabaseWrapper], bool] = DatabaseWrapper.is_usable

    def counted(self: DatabaseWrapper) -> bool:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(DatabaseWrapper, "is_usable", counted)
    return calls


async def test_a_connection_used_a_moment_ago_is_reused_without_a_health_check(
    one_thread: None, health_checks: list[int]
) -> None:
    pids = [await db_async(backend_pid)() for _ in range(5)]
    assert len(set(pids)) == 1
    assert health_checks == []


async def test_a_connection_that_broke_while_busy_fails_once_and_is_replaced(
    one_thread: None, health_checks: list[int]
) -> None:
    pid = await db_async(backend_pid)()
    await terminate(pid)
    await asyncio.sleep(0.05)
    with pytest.raises(OperationalError):
        await db_async(backend_pid)()
    replaced = await db_async(backend_pid)()
    assert replaced != pid
    assert await db_async(backend_pid)() == replaced


async def test_an_idle_connection_is_health_checked_so_a_broken_one_costs_no_request(
    one_thread: None, health_checks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("chatservice.db.HEALTH_CHECK_IDLE_SECONDS", 0.0)  # every connection counts as idle
    pid = await db_async(backend_pid)()
    await terminate(pid)
    await asyncio.sleep(0.05)
    replaced = await db_async(backend_pid)()  # no error: the check found it dead first
    assert replaced != pid
    assert health_checks
