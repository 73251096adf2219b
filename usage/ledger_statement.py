"""The whole ledger write of one request as ONE Postgres statement (data-modifying CTEs).

The reservation is deleted, the day's quota row settled (created again if an operator deleted
it), the conversation created or touched, its two messages and the UsageRecord inserted: one
round trip, atomic on its own, no transaction to open or commit. Every data-modifying CTE runs
to completion whether or not the main statement reads it. Values go through each field's own
`pre_save` and `get_prep_value`, as the ORM's do; each model's rows travel as one JSON parameter.
`awrite` runs it on the event loop (the request path), `write` on Django's connection.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from operator import attrgetter
from typing import Any

import orjson
from django.db import DatabaseError, connection
from django.db.models import Field, Model

from chat.models import Conversation, Message
from chatservice.async_db import statements
from chatservice.statement_batches import StatementBatches
from usage.models import UsageRecord
from usage.quotas import Reservation, quota_row


@dataclass(frozen=True)
class ConversationWrite:
    """What the request keeps in its conversation: a new one (`created`) or a touch of an existing one."""

    conversation_id: uuid.UUID
    created: Conversation | None
    touched_at: datetime
    messages: Sequence[Message]


def _json(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact: numeric's input reads it as written
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj, default=_json).decode()


@dataclass(frozen=True, slots=True)
class _Table:
    """One model's insert, worked out once: the SQL (its rows as one JSON parameter named `param`)
    and, per column, how a value is read off an unsaved instance and prepared for the database."""

    sql: str
    columns: tuple[tuple[str, Callable[[Model], Any], Callable[[Any], Any]], ...]

    def rows(self, objs: Sequence[Model]) -> list[dict[str, Any]]:
        """The instances as `{column: value}`, each value prepared by its field as the ORM would."""
        return [{column: prep(read(obj)) for column, read, prep in self.columns} for obj in objs]


def _reader(field: Field[Any, Any]) -> Callable[[Model], Any]:
    """The field's `pre_save(obj, add=True)`; a plain attribute read where the field keeps the base one."""
    if type(field).pre_save is Field.pre_save:  # no auto_now or the like: pre_save is getattr(obj, attname)
        return attrgetter(field.attname)
    return lambda obj: field.pre_save(obj, add=True)


@functools.cache
def _table(model: type[Model], param: str) -> _Table:
    """`INSERT INTO table (columns) SELECT columns FROM jsonb_populate_recordset(...)` for unsaved
    instances of `model`: all their rows are ONE JSON parameter, so the statement's text and its
    handful of parameters stay the same from one request to the next (it is prepared once per
    connection), whatever the values. Postgres converts each JSON value with the column type's
    own input function: a Decimal goes as its exact text, a UUID or a timestamp as its ISO form."""
    opts = model._meta
    quote = statements.database.ops.quote_name
    fields = [f for f in opts.concrete_fields if not f.db_returning]  # the serial id comes from the database
    names = ", ".join(quote(str(f.column)) for f in fields)
    table = quote(opts.db_table)
    return _Table(
        sql=(
            f"INSERT INTO {table} ({names}) SELECT {names}"
            f" FROM jsonb_populate_recordset(NULL::{table}, %({param})s::jsonb)"
        ),
        columns=tuple((str(f.column), _reader(f), f.get_prep_value) for f in fields),
    )


def _insert(objs: Sequence[Model], param: str, params: dict[str, Any]) -> str:
    """The insert of `objs` (instances of one model); their rows go into `params[param]`."""
    table = _table(type(objs[0]), param)
    params[param] = _dumps(table.rows(objs))
    return table.sql


# The reservation is deleted before the day row is locked, the order the reaper and release take
# (`usage.quotas._reap_rows`): the day row's insert reads `held` in its FROM, so the DELETE runs
# before the insert meets (and locks) the existing row. Read only in the SET, `held` ran after
# that lock, and a write settling a reservation the reaper had just deleted deadlocked with it.
_SETTLE_CTES = (
    "held AS (DELETE FROM usage_tokenreservation WHERE id = %(reservation_id)s::uuid RETURNING tokens)",
    """day_row AS (
    INSERT INTO usage_dailytokenusage (user_id, day, used, reserved)
    SELECT %(user_id)s::bigint, %(day)s::date, %(actual)s::bigint, 0 FROM (SELECT count(*) FROM held) AS held_first
    ON CONFLICT (user_id, day) DO UPDATE
        SET used = usage_dailytokenusage.used + EXCLUDED.used,
            reserved = usage_dailytokenusage.reserved - COALESCE((SELECT SUM(tokens) FROM held), 0))""",
)


@functools.cache
def _statement_sql(conversation: str) -> str:
    """The statement's text for one of three shapes of `conversation`: "none", "created" or "touched"
    (one text per shape, so each is prepared once per connection)."""
    ctes = list(_SETTLE_CTES)
    if conversation == "created":
        ctes.append(f"conversation AS ({_table(Conversation, 'conversation').sql})")
    elif conversation == "touched":
        table = statements.database.ops.quote_name(Conversation._meta.db_table)
        ctes.append(
            f"conversation AS (UPDATE {table} SET updated_at = %(touched_at)s::timestamptz"
            " WHERE id = %(conversation_id)s::uuid)"
        )
    if conversation != "none":
        ctes.append(f"messages AS ({_table(Message, 'messages').sql})")
    pk = statements.database.ops.quote_name(str(UsageRecord._meta.pk.column))
    return f"WITH {', '.join(ctes)}\n{_table(UsageRecord, 'record').sql} RETURNING {pk}"


def statement(
    *, record: UsageRecord, reservation: Reservation, actual_tokens: int, conversation: ConversationWrite | None
) -> tuple[str, dict[str, Any]]:
    """The SQL and parameters that settle `reservation` to `actual_tokens`, insert `record` and
    keep `conversation`; the statement returns the record's id."""
    if actual_tokens < 0:
        raise ValueError("actual_tokens must be >= 0")
    params: dict[str, Any] = {
        "reservation_id": reservation.id,
        "user_id": reservation.user_id,
        "day": reservation.day,
        "actual": actual_tokens,
    }
    shape = "none"
    if conversation is not None:
        if conversation.created is not None:
            shape = "created"
            _insert([conversation.created], "conversation", params)
        else:
            shape = "touched"
            params["conversation_id"], params["touched_at"] = conversation.conversation_id, conversation.touched_at
        _insert(conversation.messages, "messages", params)
    _insert([record], "record", params)
    return _statement_sql(shape), params


def _saved(record: UsageRecord, row: tuple[Any, ...] | None) -> None:
    if row is None:
        raise DatabaseError("the ledger statement returned no row")
    record.pk = row[0]
    record._state.adding = False
    record._state.db = statements.database.alias


def write(
    *, record: UsageRecord, reservation: Reservation, actual_tokens: int, conversation: ConversationWrite | None
) -> None:
    """Settle `reservation` to `actual_tokens`, insert `record` (its pk set) and keep `conversation`."""
    sql, params = statement(
        record=record, reservation=reservation, actual_tokens=actual_tokens, conversation=conversation
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        _saved(record, cursor.fetchone())


async def awrite(
    *, record: UsageRecord, reservation: Reservation, actual_tokens: int, conversation: ConversationWrite | None
) -> None:
    """`write` from async code, on the event loop (`chatservice.async_db`): no thread hop. The
    writes of requests that end together go in one transaction (`chatservice.statement_batches`:
    one round trip, one commit and one WAL flush for all of them; a write that fails there is
    run again alone, so it fails alone)."""
    sql, params = statement(
        record=record, reservation=reservation, actual_tokens=actual_tokens, conversation=conversation
    )
    batches = _batches.get(sql)
    if batches is None:
        batches = _batches[sql] = StatementBatches(sql, lock_order=quota_row)
    _saved(record, await batches.fetchone(params))


_batches: dict[str, StatementBatches] = {}  # one per statement text (three shapes)
