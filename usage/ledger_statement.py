"""The whole ledger write of one request as ONE Postgres statement (data-modifying CTEs).

The reservation is deleted, the day's quota row settled (created again if an operator deleted
it), the conversation created or touched, its two messages and the UsageRecord inserted: one
round trip, atomic on its own, no transaction to open or commit. Every data-modifying CTE runs
to completion whether or not the main statement reads it. Values go through each field's own
`pre_save` and `get_prep_value`, as the ORM's do; each model's rows travel as one JSON parameter.
`awrite` runs it on the event loop (the request path), `write` on Django's connection.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from django.db import DatabaseError, connection
from django.db.models import Field, Model
from psycopg.types.json import Jsonb

from chat.models import Conversation, Message
from chatservice.async_db import statements
from usage.models import UsageRecord
from usage.quotas import Reservation


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


def _row(obj: Model, fields: Sequence[Field[Any, Any]]) -> dict[str, Any]:
    """An unsaved instance as `{column: value}`, each value prepared by its field as the ORM would."""
    return {str(f.column): f.get_prep_value(f.pre_save(obj, add=True)) for f in fields}


def _insert(objs: Sequence[Model], param: str, params: dict[str, Any]) -> str:
    """`INSERT INTO table (columns) SELECT columns FROM jsonb_populate_recordset(...)` for unsaved
    instances of one model: all their rows are ONE JSON parameter, so the statement's text and
    its handful of parameters stay the same from one request to the next (psycopg caches its
    parsing), whatever the values. Postgres converts each JSON value with the column type's own
    input function: a Decimal goes as its exact text, a UUID or a timestamp as its ISO form."""
    opts = objs[0]._meta
    quote = statements.database.ops.quote_name
    fields = [f for f in opts.concrete_fields if not f.db_returning]  # the serial id comes from the database
    params[param] = Jsonb([_row(obj, fields) for obj in objs], dumps=_dumps)
    columns = ", ".join(quote(str(f.column)) for f in fields)
    table = quote(opts.db_table)
    return f"INSERT INTO {table} ({columns}) SELECT {columns} FROM jsonb_populate_recordset(NULL::{table}, %({param})s)"


_SETTLE_CTES = [
    "held AS (DELETE FROM usage_tokenreservation WHERE id = %(reservation_id)s RETURNING tokens)",
    """day_row AS (
    INSERT INTO usage_dailytokenusage (user_id, day, used, reserved)
    VALUES (%(user_id)s, %(day)s, %(actual)s, 0)
    ON CONFLICT (user_id, day) DO UPDATE
        SET used = usage_dailytokenusage.used + EXCLUDED.used,
            reserved = usage_dailytokenusage.reserved - COALESCE((SELECT SUM(tokens) FROM held), 0))""",
]


def statement(
    *, record: UsageRecord, reservation: Reservation, actual_tokens: int, conversation: ConversationWrite | None
) -> tuple[str, dict[str, Any]]:
    """The SQL and parameters that settle `reservation` to `actual_tokens`, insert `record` and
    keep `conversation`; the statement returns the record's id."""
    if actual_tokens < 0:
        raise ValueError("actual_tokens must be >= 0")
    quote = statements.database.ops.quote_name
    params: dict[str, Any] = {
        "reservation_id": reservation.id,
        "user_id": reservation.user_id,
        "day": reservation.day,
        "actual": actual_tokens,
    }
    ctes = list(_SETTLE_CTES)
    if conversation is not None:
        if conversation.created is not None:
            ctes.append(f"conversation AS ({_insert([conversation.created], 'conversation', params)})")
        else:
            table = quote(Conversation._meta.db_table)
            params["conversation_id"], params["touched_at"] = conversation.conversation_id, conversation.touched_at
            ctes.append(
                f"conversation AS (UPDATE {table} SET updated_at = %(touched_at)s WHERE id = %(conversation_id)s)"
            )
        ctes.append(f"messages AS ({_insert(conversation.messages, 'messages', params)})")
    pk = quote(str(UsageRecord._meta.pk.column))
    return f"WITH {', '.join(ctes)}\n{_insert([record], 'record', params)} RETURNING {pk}", params


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
    """`write` from async code, on the event loop (`chatservice.async_db`): no thread hop."""
    sql, params = statement(
        record=record, reservation=reservation, actual_tokens=actual_tokens, conversation=conversation
    )
    _saved(record, await statements.fetchone(sql, params))
