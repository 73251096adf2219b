"""The whole ledger write of one request as ONE Postgres statement (data-modifying CTEs).

The reservation is deleted, the day's quota row settled (created again if an operator deleted
it), the conversation created or touched, its two messages and the UsageRecord inserted: one
round trip, atomic on its own, no transaction to open or commit. Every data-modifying CTE runs
to completion whether or not the main statement reads it. Values go through each field's own
`get_db_prep_save`, so they are stored exactly as the ORM would store them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import Model

from chat.models import Conversation, Message
from usage.models import UsageRecord
from usage.quotas import Reservation


@dataclass(frozen=True)
class ConversationWrite:
    """What the request keeps in its conversation: a new one (`created`) or a touch of an existing one."""

    conversation_id: uuid.UUID
    created: Conversation | None
    touched_at: datetime
    messages: Sequence[Message]


def _insert(objs: Sequence[Model], prefix: str, params: dict[str, Any]) -> str:
    """`INSERT INTO table (columns) VALUES (...), ...` for unsaved instances of one model."""
    opts = objs[0]._meta
    quote = connection.ops.quote_name
    fields = [f for f in opts.concrete_fields if not f.db_returning]  # the serial id comes from the database
    rows = []
    for i, obj in enumerate(objs):
        names = []
        for j, f in enumerate(fields):
            name = f"{prefix}{i}_{j}"
            params[name] = f.get_db_prep_save(f.pre_save(obj, add=True), connection)
            names.append(f"%({name})s")
        rows.append(f"({', '.join(names)})")
    columns = ", ".join(quote(str(f.column)) for f in fields)
    return f"INSERT INTO {quote(opts.db_table)} ({columns}) VALUES {', '.join(rows)}"


def write(
    *, record: UsageRecord, reservation: Reservation, actual_tokens: int, conversation: ConversationWrite | None
) -> None:
    """Settle `reservation` to `actual_tokens`, insert `record` (its pk set) and keep `conversation`."""
    if actual_tokens < 0:
        raise ValueError("actual_tokens must be >= 0")
    quote = connection.ops.quote_name
    params: dict[str, Any] = {
        "reservation_id": reservation.id,
        "user_id": reservation.user_id,
        "day": reservation.day,
        "actual": actual_tokens,
    }
    ctes = [
        "held AS (DELETE FROM usage_tokenreservation WHERE id = %(reservation_id)s RETURNING tokens)",
        """day_row AS (
    INSERT INTO usage_dailytokenusage (user_id, day, used, reserved)
    VALUES (%(user_id)s, %(day)s, %(actual)s, 0)
    ON CONFLICT (user_id, day) DO UPDATE
        SET used = usage_dailytokenusage.used + EXCLUDED.used,
            reserved = usage_dailytokenusage.reserved - COALESCE((SELECT SUM(tokens) FROM held), 0))""",
    ]
    if conversation is not None:
        if conversation.created is not None:
            ctes.append(f"conversation AS ({_insert([conversation.created], 'c', params)})")
        else:
            table = quote(Conversation._meta.db_table)
            params["conversation_id"], params["touched_at"] = conversation.conversation_id, conversation.touched_at
            ctes.append(
                f"conversation AS (UPDATE {table} SET updated_at = %(touched_at)s WHERE id = %(conversation_id)s)"
            )
        ctes.append(f"messages AS ({_insert(conversation.messages, 'm', params)})")
    pk = quote(str(UsageRecord._meta.pk.column))
    sql = f"WITH {', '.join(ctes)}\n{_insert([record], 'r', params)} RETURNING {pk}"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    record.pk = row[0]
    record._state.adding = False
    record._state.db = connection.alias
