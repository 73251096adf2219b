"""`chatservice.async_db`: the request path's statements on async connections — reused, bounded,
replaced when broken, Django's errors — and the ledger write that runs on them."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
from channels.db import database_sync_to_async
from django.db import IntegrityError, OperationalError, connection, connections
from django.forms.models import model_to_dict
from django.test import override_settings

from chatservice.async_db import AsyncStatements, _asyncpg_params, statements
from chatservice.db import db_async

pytestmark = pytest.mark.django_db(transaction=True)

PID = "SELECT pg_backend_pid()"


@database_sync_to_async
def terminate(pid: int) -> None:
    """End another connection's backend, as a Postgres restart or a proxy timeout would."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])


async def backend_pid(db: AsyncStatements) -> int:
    row = await db.fetchone(PID, {})
    assert row is not None
    return int(row[0])


@pytest.fixture
async def db() -> AsyncIterator[AsyncStatements]:
    fresh = AsyncStatements(max_connections=3)
    yield fresh
    await fresh.aclose()


async def test_a_connection_is_kept_and_reused_between_statements(db: AsyncStatements) -> None:
    pids = {await backend_pid(db) for _ in range(5)}
    assert len(pids) == 1


async def test_no_more_than_the_limit_are_open_at_once_however_many_statements_run(db: AsyncStatements) -> None:
    rows = await asyncio.gather(*(db.fetchone("SELECT pg_backend_pid(), pg_sleep(0.02)", {}) for _ in range(30)))
    pids = {row[0] for row in rows if row is not None}
    assert 1 <= len(pids) <= 3  # 30 statements, at most 3 connections, each kept for the next


PREPARED = "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %(text)s"


@pytest.mark.parametrize("prepared", [True, False])
async def test_statements_are_prepared_once_per_connection_unless_turned_off(
    db: AsyncStatements, prepared: bool
) -> None:
    statement = "SELECT pg_backend_pid() /* prepared-or-not */"
    with override_settings(DB_PREPARED_STATEMENTS=prepared):
        pids = {(await db.fetchone(statement, {}) or (0,))[0] for _ in range(3)}
        assert len(pids) == 1  # one connection ran it three times

        row = await db.fetchone(PREPARED, {"text": "%prepared-or-not%"})

    assert row is not None and row[0] == (1 if prepared else 0)


SYNCHRONOUS_COMMIT = (
    "SELECT current_setting('synchronous_commit'), current_setting('application_name'), pg_backend_pid()"
)


async def test_statements_that_need_not_wait_for_the_disk_run_on_connections_of_their_own(
    db: AsyncStatements,
) -> None:
    options = {**connection.settings_dict["OPTIONS"], "options": "-c application_name=ledger-test"}
    db._database = type(connections["default"])({**connection.settings_dict, "OPTIONS": options}, "default")
    durable = await db.fetchone(SYNCHRONOUS_COMMIT, {})
    relaxed = await db.fetchone(SYNCHRONOUS_COMMIT, {}, synchronous_commit=False)
    again = await db.fetchone(SYNCHRONOUS_COMMIT, {})
    assert durable is not None and relaxed is not None and again is not None
    assert durable[:2] == ("on", "ledger-test") and again == durable  # the durable connection is kept
    assert relaxed[:2] == ("off", "ledger-test")  # the database's own options are kept too
    assert relaxed[2] != durable[2]


async def test_idle_connections_a_restart_ended_cost_no_request(db: AsyncStatements) -> None:
    first = await asyncio.gather(*(db.fetchone("SELECT pg_backend_pid(), pg_sleep(0.02)", {}) for _ in range(3)))
    idle = {row[0] for row in first if row is not None}
    assert len(idle) == 3
    for pid in idle:  # a restart ends every connection
        await terminate(pid)
    await asyncio.sleep(0.05)  # the loop sees their sockets close
    replaced = await backend_pid(db)  # no error: none of the dead ones is handed out
    assert replaced not in idle
    assert await backend_pid(db) == replaced


async def test_a_connection_broken_mid_statement_fails_that_statement_and_every_idle_one_is_dropped(
    db: AsyncStatements,
) -> None:
    first = await asyncio.gather(*(db.fetchone("SELECT pg_backend_pid(), pg_sleep(0.02)", {}) for _ in range(2)))
    idle = {row[0] for row in first if row is not None}
    assert len(idle) == 2
    pid = await backend_pid(db)  # the one the next statement takes
    running = asyncio.ensure_future(db.fetchone("SELECT pg_backend_pid(), pg_sleep(5)", {}))
    await asyncio.sleep(0.2)
    await terminate(pid)
    with pytest.raises(OperationalError):  # Django's error class, not the driver's
        await asyncio.wait_for(running, timeout=5)
    replaced = await backend_pid(db)  # a fresh one: the other idle one went with it (a restart ends them all)
    assert replaced not in idle
    assert await backend_pid(db) == replaced


async def test_a_connection_that_died_while_idle_is_checked_and_costs_no_request(
    db: AsyncStatements, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = await backend_pid(db)
    await terminate(pid)  # a restart or a proxy's idle timeout while nothing was running
    await asyncio.sleep(0.05)
    monkeypatch.setattr("chatservice.async_db.HEALTH_CHECK_IDLE_SECONDS", 0.0)  # it counts as idle
    replaced = await backend_pid(db)  # no error: the check found it dead and a fresh one served
    assert replaced != pid
    assert await backend_pid(db) == replaced


async def test_a_database_that_is_down_fails_at_once(db: AsyncStatements) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    config = connections["default"].settings_dict  # the same dict every wrapper of the alias reads
    port = config["PORT"]
    config["PORT"] = str(closed_port)
    try:
        with pytest.raises(OperationalError):
            await asyncio.wait_for(backend_pid(db), timeout=5)
    finally:
        config["PORT"] = port
    assert await backend_pid(db) > 0  # and back, on connections to the right port


async def test_a_database_that_does_not_exist_is_down_to_callers(db: AsyncStatements) -> None:
    """As with psycopg, any failure to connect is an OperationalError (what admission and the ledger
    write treat as the database being down), not the server's error class for the cause."""
    config = connections["default"].settings_dict
    name = config["NAME"]
    config["NAME"] = "no_such_database"
    try:
        with pytest.raises(OperationalError):
            await asyncio.wait_for(backend_pid(db), timeout=5)
    finally:
        config["NAME"] = name
    assert await backend_pid(db) > 0


async def test_a_refused_statement_raises_djangos_error_and_leaves_its_connection_usable(
    db: AsyncStatements,
) -> None:
    pid = await backend_pid(db)
    with pytest.raises(IntegrityError):
        await db.fetchone("INSERT INTO accounts_plan (name) VALUES (NULL)", {})
    assert await backend_pid(db) == pid


async def test_the_ledger_write_on_the_event_loop_stores_what_the_orm_path_stores() -> None:
    from accounts.services import user_get_or_create
    from chat.models import Conversation, Message
    from tests.usage.test_ledger_write import NOON, _outcome
    from usage.models import UsageRecord
    from usage.quotas import token_reserve
    from usage.services import usage_settle, usage_write

    user, _ = await db_async(user_get_or_create)(username="async-ledger", plan_name="premium")

    async def written(path: str) -> tuple[dict[str, object], list[dict[str, object]], dict[str, object]]:
        reservation = await db_async(token_reserve)(user_id=user.pk, limit=10**6, tokens=100, now=NOON)
        conversation_id = uuid.uuid4()
        outcome = _outcome(
            user.pk,
            reservation,
            transport="rest",
            conversation_id=conversation_id,
            new_conversation=True,
            user_message="Ünïcode — 'quotes' \"and\" \\ backslashes ✓",
            system_prompt="be brief",
            fallback_path=["openai", "claude"],
            attempts=2,
            time_to_first_token_ms=None,
            flagged=True,
        )
        if path == "event loop":
            record = await usage_write(outcome)
        else:
            record = await db_async(usage_settle)(outcome=outcome)
        stored = await db_async(UsageRecord.objects.get)(pk=record.pk)
        messages = await db_async(list)(Message.objects.filter(conversation_id=conversation_id).order_by("id"))
        conversation = await db_async(Conversation.objects.get)(pk=conversation_id)
        ignore = {"id", "request_id", "conversation", "conversation_id", "created_at", "updated_at"}
        return (
            {k: v for k, v in model_to_dict(stored).items() if k not in ignore},
            [{k: v for k, v in model_to_dict(m).items() if k not in ignore} for m in messages],
            {k: v for k, v in model_to_dict(conversation).items() if k not in ignore},
        )

    on_the_loop = await written("event loop")
    by_the_orm = await written("orm")

    assert on_the_loop == by_the_orm
    record, messages, conversation = on_the_loop
    assert record["cost"] == dataclasses.asdict(_outcome(user.pk, None))["cost"]  # exact, not a float
    assert record["fallback_path"] == ["openai", "claude"] and record["time_to_first_token_ms"] is None
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "Ünïcode — 'quotes' \"and\" \\ backslashes ✓"
    assert conversation["system_prompt"] == "be brief"


async def test_the_ledger_write_is_retried_once_on_a_broken_connection_and_never_counted_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from accounts.services import user_get_or_create
    from tests.usage.test_ledger_write import NOON, _outcome
    from usage.models import DailyTokenUsage, UsageRecord
    from usage.quotas import token_reserve
    from usage.services import usage_write

    user, _ = await db_async(user_get_or_create)(username="broken-connection", plan_name="premium")
    reservation = await db_async(token_reserve)(user_id=user.pk, limit=10_000, tokens=100, now=NOON)
    outcome = _outcome(user.pk, reservation)

    # The write's connection breaks while the statement runs (it waits for the day's row, held here).
    async with statements._connection(True) as holder, holder.transaction():
        await holder.execute("SELECT 1 FROM usage_dailytokenusage WHERE user_id = $1 FOR UPDATE", user.pk)
        writing = asyncio.ensure_future(usage_write(outcome))
        waiting: list[int] = []
        for _ in range(50):
            await asyncio.sleep(0.05)
            waiting = [
                row["pid"]
                for row in await holder.fetch(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND query LIKE '%DELETE FROM usage_tokenreservation%'"
                )
            ]
            if waiting:
                break
        assert len(waiting) == 1
        await terminate(waiting[0])
        await asyncio.sleep(0.1)
    record = await asyncio.wait_for(writing, timeout=10)  # the first try failed, the second wrote

    # The same request written again (a retry after a write that did commit): it finds the record, adds nothing.
    again = await usage_write(outcome)

    assert again.pk == record.pk
    assert sum("retrying on a fresh connection" in r.getMessage() for r in caplog.records) == 1
    day = await db_async(DailyTokenUsage.objects.get)(user_id=user.pk, day=NOON.date())
    assert (day.used, day.reserved) == (42, 0)
    assert await db_async(UsageRecord.objects.filter(user_id=user.pk).count)() == 1


def test_djangos_connection_parameters_reach_asyncpg_as_libpq_would_read_them() -> None:
    """The database, the user, SSL and server settings of Django's DATABASES reach the request
    path's connections; psycopg's own parameters do not, and the statement cache follows
    DB_PREPARED_STATEMENTS."""
    django_params = {
        "dbname": "ledger",
        "user": "chat",
        "password": "secret",
        "host": "db.internal",
        "port": "6432",
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ssl/db.pem",
        "connect_timeout": "5",
        "options": "-c statement_timeout=5000 -cwork_mem=8MB",
        "client_encoding": "UTF8",
        "prepare_threshold": None,
    }
    params = _asyncpg_params(django_params, synchronous_commit=False, prepared=False)
    assert params["dsn"] == "postgresql://?sslmode=verify-full&sslrootcert=%2Fetc%2Fssl%2Fdb.pem"
    assert (params["database"], params["user"], params["password"]) == ("ledger", "chat", "secret")
    assert (params["host"], params["port"], params["timeout"]) == ("db.internal", 6432, 5.0)
    assert params["server_settings"] == {"statement_timeout": "5000", "work_mem": "8MB", "synchronous_commit": "off"}
    assert params["statement_cache_size"] == 0
    assert _asyncpg_params({"dbname": "ledger"}, synchronous_commit=True, prepared=True)["statement_cache_size"] > 0
