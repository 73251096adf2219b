"""The statements on every request's path, run on asyncpg connections on the event loop.

The ORM runs on a thread pool (`chatservice.db.db_async`), on psycopg. The two raw statements
each request makes on Postgres — the token reservation and the one-statement ledger write — run
here instead: no thread hop and no GIL hand-off between a database thread and the loop, no ORM,
and asyncpg, whose connections stay registered with the event loop (psycopg's async connections
add and remove a reader on the loop for every wait): a statement costs about half the CPU
(bench/README.md, "17:30-18:45 UTC"). Statements are written as for psycopg (`%(name)s`
parameters, each with its type where Postgres could not infer it) and converted once.
Each statement is prepared on the server the first time a connection runs it
(DB_PREPARED_STATEMENTS, on by default: asyncpg's statement cache): Postgres parses and plans it
once per connection, not once per request. Turned off, nothing is kept prepared on the server,
for poolers that do not keep prepared statements.

Connections are opened from Django's DATABASES settings (the same database, user and options)
in autocommit mode, at most MAX_CONNECTIONS at once per event loop, and the idle ones kept. A
call takes an idle connection or opens one, so a database that is down fails the call at once,
as Django's own connections do. One that sat idle for a second or more is checked first (as
`chatservice.db` does), so a connection that died while idle costs no request; one that broke,
or was left inside a transaction, is closed rather than kept, and after a connection error every
idle one of that database is dropped (a restart ends them all). asyncpg's errors come out as
Django's (`django.db.Error` and its subclasses, by SQLSTATE class), so callers handle one family
of exceptions whichever way a statement ran.

A caller cancelled while its statement runs does not leave it running: the statement is
cancelled on the server (asyncpg sends a cancel request, as libpq does) and waited for, so when
the caller's cancellation goes on, the statement has either committed or not
(`chatservice.batches` undoes what it may have done).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import shlex
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode

import asyncpg
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    DataError,
    IntegrityError,
    InterfaceError,
    InternalError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    connections,
)
from django.db.backends.base.base import BaseDatabaseWrapper

from chatservice.db import HEALTH_CHECK_IDLE_SECONDS

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 16  # open at once per event loop and database; more concurrent calls wait for one
STATEMENT_CACHE_SIZE = 100  # prepared statements kept per connection (asyncpg's LRU)
CLOSE_TIMEOUT_SECONDS = 5.0

_Key = tuple[Any, ...]
_T = TypeVar("_T")

# Django's exception for each SQLSTATE class, as psycopg's error classes map onto Django's.
_ERROR_CLASSES: dict[str, type[DatabaseError]] = {
    "08": OperationalError,  # connection exception
    "22": DataError,
    "23": IntegrityError,
    "40": OperationalError,  # transaction rollback: serialization failure, deadlock
    "42": ProgrammingError,
    "53": OperationalError,  # insufficient resources
    "57": OperationalError,  # operator intervention: query canceled, admin shutdown
    "0A": NotSupportedError,
    "XX": InternalError,
}
# Django's PostgreSQL connection parameters that asyncpg has no use for (psycopg's own).
_PSYCOPG_ONLY = ("client_encoding", "cursor_factory", "context", "prepare_threshold")
_NAMED = re.compile(r"%\((\w+)\)s|%%")


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
        parameters. (`connections[alias]` would build one per asyncio task.)"""
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
        query, names = _positional(sql)
        async with self._connection(synchronous_commit) as conn:
            row = await _to_the_end(conn, conn.fetchrow(query, *(params[name] for name in names)))
        return tuple(row) if row is not None else None

    async def fetchone_each(
        self, sql: str, params: Sequence[Mapping[str, Any]], *, synchronous_commit: bool = True
    ) -> list[tuple[Any, ...] | None]:
        """Run `sql` once per parameter set, in order, in ONE transaction (one commit) sent as one
        pipeline (one round trip), and return each run's row: each run must return exactly one
        row. An error in any run rolls back them all."""
        if len(params) == 1:  # its own transaction already
            return [await self.fetchone(sql, params[0], synchronous_commit=synchronous_commit)]
        query, names = _positional(sql)
        runs = [[run[name] for name in names] for run in params]
        async with self._connection(synchronous_commit) as conn:
            rows = await _to_the_end(conn, conn.fetchmany(query, runs))  # one implicit transaction
        if len(rows) != len(runs):
            raise ProgrammingError(f"a statement run in a batch returned {len(rows)} rows for {len(runs)} runs")
        return [tuple(row) for row in rows]

    @contextlib.asynccontextmanager
    async def _connection(self, synchronous_commit: bool) -> AsyncIterator[asyncpg.Connection]:
        """A connection of this loop's pool for the database (and commit mode), for one use."""
        connect_kwargs, key = self._connection_params(self.database, synchronous_commit)
        loop = asyncio.get_running_loop()
        pooled = self._loops.setdefault(loop, {}).get(key)
        if pooled is None:
            pooled = self._loops[loop][key] = _Connections(self._max_connections)
        with _django_errors():
            async with pooled.slot:
                conn = await pooled.take()
                if conn is None:
                    conn = await _connect(connect_kwargs)
                try:
                    yield conn
                except (asyncpg.PostgresConnectionError, OSError):
                    pooled.drop_idle()  # a restart ended them all
                    raise
                finally:
                    await pooled.release(conn)

    async def aclose(self) -> None:
        """Close this loop's idle connections."""
        for pooled in self._loops.pop(asyncio.get_running_loop(), {}).values():
            while pooled.idle:
                await _close_quietly(pooled.idle.pop()[0])

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
            params = self._params[key] = _asyncpg_params(
                database.get_connection_params(), synchronous_commit, bool(settings.DB_PREPARED_STATEMENTS)
            )
        return params, key


async def _connect(connect_kwargs: dict[str, Any]) -> asyncpg.Connection:
    """A new connection; any failure to get one is Django's OperationalError, as with psycopg
    (a refused port, an unknown database, a rejected login, a server starting up)."""
    try:
        return await asyncpg.connect(**connect_kwargs)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        raise OperationalError(f"could not connect to the database: {exc}") from exc


def _asyncpg_params(django_params: Mapping[str, Any], synchronous_commit: bool, prepared: bool) -> dict[str, Any]:
    """asyncpg's `connect` arguments for Django's (psycopg's) connection parameters: the same
    database, user, SSL and server settings."""
    options = {k: v for k, v in django_params.items() if k not in _PSYCOPG_ONLY}
    server_settings = _server_settings(str(options.pop("options", "") or ""))
    kwargs: dict[str, Any] = {
        "database": options.pop("dbname", None),
        "user": options.pop("user", None),
        "password": options.pop("password", None),
        "host": options.pop("host", None) or None,
        "port": int(options.pop("port")) if options.get("port") else None,
    }
    if "connect_timeout" in options:
        kwargs["timeout"] = float(options.pop("connect_timeout"))
    # The rest goes as libpq does it: asyncpg reads sslmode, sslrootcert, sslcert, sslkey,
    # target_session_attrs and the like from a DSN's query, and takes any other key there
    # (application_name, ...) as a server setting.
    if any(not isinstance(value, str | int | float) for value in options.values()):
        raise ImproperlyConfigured(f"DATABASES OPTIONS the request path cannot pass on to asyncpg: {sorted(options)}")
    if not synchronous_commit:
        server_settings["synchronous_commit"] = "off"
    return {
        "dsn": "postgresql://" + (f"?{urlencode(options)}" if options else ""),
        **{k: v for k, v in kwargs.items() if v is not None},
        "server_settings": server_settings,
        "statement_cache_size": STATEMENT_CACHE_SIZE if prepared else 0,
    }


def _server_settings(options: str) -> dict[str, str]:
    """libpq's `options` (`-c name=value ...`) as server settings."""
    found: dict[str, str] = {}
    words = shlex.split(options)
    for i, word in enumerate(words):
        setting = word[2:] if word.startswith("-c") and len(word) > 2 else (words[i + 1] if word == "-c" else None)
        if setting is not None and "=" in setting:
            name, _, value = setting.partition("=")
            found[name.strip()] = value.strip()
    return found


@functools.lru_cache(maxsize=256)
def _positional(sql: str) -> tuple[str, tuple[str, ...]]:
    """`sql` with psycopg's named parameters (`%(name)s`) as asyncpg's positional ones (`$1`),
    and the names in their order; `%%` is a literal `%`."""
    names: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "%"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED.sub(replace, sql), tuple(names)


@contextlib.contextmanager
def _django_errors() -> Any:
    """asyncpg's exceptions as Django's, by SQLSTATE class (as Django maps psycopg's)."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        error = _ERROR_CLASSES.get((exc.sqlstate or "")[:2], DatabaseError)
        raise error(str(exc)) from exc
    except asyncpg.InterfaceError as exc:
        raise InterfaceError(str(exc)) from exc
    except (TimeoutError, OSError) as exc:  # no connection to the server
        raise OperationalError(str(exc) or type(exc).__name__) from exc


async def _to_the_end(conn: asyncpg.Connection, operation: Awaitable[_T]) -> _T:
    """Await `operation` on `conn`; if the caller is cancelled meanwhile, wait until the statement
    has ended on the server, committed or not, before the cancellation goes on.

    asyncpg, when the wait for a statement's result is cancelled, sends the server a cancel
    request (from a connection of its own, as libpq does) and marks the connection as cancelling
    until the server acknowledges; the wait for that acknowledgement is the one asyncpg's own pool
    makes before it reuses a connection (`_wait_for_cancellation`, asyncpg's, not public API: a
    test fails if it goes). The statement is awaited in the caller's task, with no task of its own:
    a task would add two turns of the event loop to every statement, which under load is
    milliseconds."""
    try:
        return await operation
    except asyncio.CancelledError:
        try:
            await conn._protocol._wait_for_cancellation()
        except asyncio.CancelledError:  # cancelled again while waiting: the connection is not reused
            conn.terminate()
            raise
        raise


class _Connections:
    """One loop's connections to one database: at most `limit` in use, the idle ones kept with
    the time they were last used."""

    def __init__(self, limit: int) -> None:
        self.slot = asyncio.Semaphore(limit)
        self.idle: list[tuple[asyncpg.Connection, float]] = []

    async def take(self) -> asyncpg.Connection | None:
        """The most recently used idle connection, None when there is none (or every one is dead).

        As on the ORM path (`chatservice.db`), one that sat idle for HEALTH_CHECK_IDLE_SECONDS
        or more is checked with a `SELECT 1` first, so a connection that died while idle (a
        database restart, a proxy's idle timeout) costs no request; one used a moment ago is
        as good as checked, and the busy path makes no extra round trip."""
        while self.idle:
            conn, last_used = self.idle.pop()
            if conn.is_closed():
                continue
            if time.monotonic() - last_used < HEALTH_CHECK_IDLE_SECONDS:
                return conn
            try:
                await conn.execute("SELECT 1")
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                self.drop_idle()  # one died while idle: so did the others
                conn.terminate()
                return None
            return conn
        return None

    async def release(self, conn: asyncpg.Connection) -> None:
        """Keep a connection that is idle outside any transaction (an error such as a unique
        violation leaves it so); close any other (broken, cancelled mid-statement)."""
        if not conn.is_closed() and not conn.is_in_transaction():
            self.idle.append((conn, time.monotonic()))
            return
        conn.terminate()

    def drop_idle(self) -> None:
        while self.idle:
            self.idle.pop()[0].terminate()  # no round trip: the server is likely gone


async def _close_quietly(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=CLOSE_TIMEOUT_SECONDS)
    except Exception:  # closing a broken connection must not hide the statement's own error
        logger.debug("closing a database connection failed", exc_info=True)
        conn.terminate()


statements = AsyncStatements()
