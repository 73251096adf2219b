"""The statements on every request's path, run on psycopg's async connections on the event loop.

The ORM runs on a thread pool (`chatservice.db.db_async`). The two raw statements each
request makes on Postgres — the token reservation and the one-statement ledger write — run
here instead: no thread hop and no GIL hand-off between a database thread and the loop, no
ORM, and a handful of parameters (rows go as JSON), so psycopg caches the statement's parsing.
Each statement is prepared on the server the first time a connection runs it
(DB_PREPARED_STATEMENTS, on by default): Postgres parses and plans it once per connection, not
once per request. Django leaves psycopg's prepared statements off, for poolers that do not keep
them; Django's own connections keep that default.

Connections are opened from Django's DATABASES settings (the same database, user and
adapters) in autocommit mode, at most MAX_CONNECTIONS at once per event loop, and the idle
ones kept. A call takes an idle connection or opens one, so a database that is down fails the
call at once, as Django's own connections do. One that sat idle for a second or more is
checked first (as `chatservice.db` does), so a connection that died while idle costs no
request; one that broke, or was left inside a transaction, is closed rather than kept, and
after a connection error every idle one of that database is dropped (a restart ends them
all). psycopg's errors come out as Django's (`django.db.Error` and its subclasses), so callers
handle one family of exceptions whichever way a statement ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import psycopg
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg.pq import TransactionStatus

from chatservice.db import HEALTH_CHECK_IDLE_SECONDS

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 16  # open at once per event loop and database; more concurrent calls wait for one

_Key = tuple[Any, ...]


class AsyncStatements:
    """Single statements on Postgres from async code, over per-loop idle connections."""

    def __init__(self, alias: str = DEFAULT_DB_ALIAS, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self._alias = alias
        self._max_connections = max_connections
        self._database: BaseDatabaseWrapper | None = None
        self._params: dict[_Key, dict[str, Any]] = {}
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_Key, _Connections]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def database(self) -> BaseDatabaseWrapper:
        """A wrapper of the alias's settings, never connected itself: it gives the connection
        parameters and the error mapping. (`connections[alias]` would build one per asyncio task.)"""
        if self._database is None:
            self._database = connections.create_connection(self._alias)
        return self._database

    @property
    def available(self) -> bool:
        """True when the database is Postgres (elsewhere callers use the ORM on threads)."""
        return self.database.vendor == "postgresql"

    async def fetchone(
        self, sql: str, params: Mapping[str, Any], *, synchronous_commit: bool = True
    ) -> tuple[Any, ...] | None:
        """Run one statement (its own transaction) and return its first row, if any.

        `synchronous_commit=False` runs it on connections whose commits do not wait for their
        WAL flush (Postgres' `synchronous_commit = off`): the statement's effects are visible at
        once and reach the disk within a few hundred milliseconds, or with the next synchronous
        commit, whichever is first; a database crash in between loses them (and only them: WAL
        is replayed in order). For state that may be lost in a database crash and nothing else.
        """
        async with self._connection(synchronous_commit) as conn:
            cursor = await conn.execute(sql, params)
            return await cursor.fetchone() if cursor.description is not None else None

    async def fetchone_each(
        self, sql: str, params: Sequence[Mapping[str, Any]], *, synchronous_commit: bool = True
    ) -> list[tuple[Any, ...] | None]:
        """Run `sql` once per parameter set, in order, in ONE transaction (one commit) sent as one
        pipeline (one round trip), and return each run's first row. An error in any run rolls
        back them all (and the connection, left inside the failed transaction, is closed)."""
        async with self._connection(synchronous_commit) as conn:
            if len(params) == 1:  # its own transaction already; a pipeline would cost more than it saves
                cursor = await conn.execute(sql, params[0])
                return [await cursor.fetchone() if cursor.description is not None else None]
            cursor = conn.cursor()
            async with conn.pipeline():
                await conn.execute("BEGIN")
                await cursor.executemany(sql, params, returning=True)
                await conn.execute("COMMIT")
            rows: list[tuple[Any, ...] | None] = []
            while True:
                rows.append(await cursor.fetchone() if cursor.description is not None else None)
                if not cursor.nextset():
                    return rows

    @contextlib.asynccontextmanager
    async def _connection(self, synchronous_commit: bool) -> AsyncIterator[psycopg.AsyncConnection]:
        """A connection of this loop's pool for the database (and commit mode), for one use."""
        database = self.database
        connect_kwargs, key = self._connection_params(database, synchronous_commit)
        pooled = self._loops.setdefault(asyncio.get_running_loop(), {}).get(key)
        if pooled is None:
            pooled = self._loops[asyncio.get_running_loop()][key] = _Connections(self._max_connections)
        with database.wrap_database_errors:  # psycopg.OperationalError -> django.db.OperationalError, ...
            async with pooled.slot:
                conn = await pooled.take()
                if conn is None:
                    conn = await psycopg.AsyncConnection.connect(autocommit=True, **connect_kwargs)
                try:
                    yield conn
                except psycopg.OperationalError:
                    pooled.drop_idle()  # a restart ended them all
                    raise
                finally:
                    await pooled.release(conn)

    async def aclose(self) -> None:
        """Close this loop's idle connections."""
        for pooled in self._loops.pop(asyncio.get_running_loop(), {}).values():
            while pooled.idle:
                await pooled.idle.pop()[0].close()

    def _connection_params(
        self, database: BaseDatabaseWrapper, synchronous_commit: bool = True
    ) -> tuple[dict[str, Any], _Key]:
        # Keyed on what names the database: tests (and an operator's settings change) may point
        # the same alias elsewhere, and a connection must never serve another database.
        config = database.settings_dict
        key = (
            *(str(config.get(k)) for k in ("NAME", "USER", "PASSWORD", "HOST", "PORT", "OPTIONS")),
            bool(settings.DB_PREPARED_STATEMENTS),
            synchronous_commit,
        )
        params = self._params.get(key)
        if params is None:
            params = {k: v for k, v in database.get_connection_params().items() if k != "cursor_factory"}
            if settings.DB_PREPARED_STATEMENTS:
                params["prepare_threshold"] = 0  # prepared at the first execution on each connection
            if not synchronous_commit:
                params["options"] = f"{params.get('options') or ''} -c synchronous_commit=off".strip()
            self._params[key] = params
        return params, key


class _Connections:
    """One loop's connections to one database: at most `limit` in use, the idle ones kept with
    the time they were last used."""

    def __init__(self, limit: int) -> None:
        self.slot = asyncio.Semaphore(limit)
        self.idle: list[tuple[psycopg.AsyncConnection, float]] = []

    async def take(self) -> psycopg.AsyncConnection | None:
        """The most recently used idle connection, None when there is none (or every one is dead).

        As on the ORM path (`chatservice.db`), one that sat idle for HEALTH_CHECK_IDLE_SECONDS
        or more is checked with a `SELECT 1` first, so a connection that died while idle (a
        database restart, a proxy's idle timeout) costs no request; one used a moment ago is
        as good as checked, and the busy path makes no extra round trip."""
        while self.idle:
            conn, last_used = self.idle.pop()
            if conn.closed:
                continue
            if time.monotonic() - last_used < HEALTH_CHECK_IDLE_SECONDS:
                return conn
            try:
                await conn.execute("SELECT 1")
            except psycopg.Error:
                self.drop_idle()  # one died while idle: so did the others
                await _close_quietly(conn)
                return None
            return conn
        return None

    async def release(self, conn: psycopg.AsyncConnection) -> None:
        """Keep a connection that is idle outside any transaction (an error such as a unique
        violation leaves it so in autocommit mode); close any other (broken, cancelled mid-statement)."""
        if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
            self.idle.append((conn, time.monotonic()))
            return
        await _close_quietly(conn)

    def drop_idle(self) -> None:
        while self.idle:
            self.idle.pop()[0].pgconn.finish()  # no round trip: the server is likely gone


async def _close_quietly(conn: psycopg.AsyncConnection) -> None:
    try:
        await conn.close()
    except Exception:  # closing a broken connection must not hide the statement's own error
        logger.debug("closing a database connection failed", exc_info=True)


statements = AsyncStatements()
