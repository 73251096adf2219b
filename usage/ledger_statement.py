"""The whole ledger write of one request as ONE Postgres statement (data-modifying CTEs).

The reservation is deleted, the day's quota row settled (created again if an operator deleted
it), the conversation created or touched, its two messages and the UsageRecord inserted: one
round trip, atomic on its own, no transaction to open or commit. Every data-modifying CTE runs
to completion whether or not the main statement reads it. Values go through each field's own
`pre_save` and `get_prep_value`, as the ORM's do, from plain field values (no model instance is
made for a row: on the request path that cost more than the rest of the statement's parameters);
each model's rows travel as one JSON parameter.
`awrite` runs it on the event loop (the request path), `write` on Django's connection.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from django.db import DatabaseError, connection
from django.db.models import DateField, DateTimeField, Field, Model
from django.utils import timezone

from chat.models import Conversation, Message
from chatservice.async_db import statements
from chatservice.statement_batches import StatementBatches
from usage.models import UsageRecord
from usage.quotas import Reservation, quota_row

Values = Mapping[str, Any]
"""One row to insert, by field attname, as a model's keyword arguments would give it: a field left out
takes its default, and an `auto_now` / `auto_now_add` date takes the time of the write."""


@dataclass(frozen=True)
class ConversationWrite:
    """What the request keeps in its conversation: a new one (`created`) or a touch of an existing one."""

    conversation_id: uuid.UUID
    created: Values | None
    touched_at: datetime
    messages: Sequence[Values]


def _json(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact: numeric's input reads it as written
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj, default=_json).decode()


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    attname: str
    default: Callable[[], Any]
    now: Callable[[], Any] | None  # an auto_now / auto_now_add date: what its pre_save(add=True) sets
    prep: Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class _Table:
    """One model's insert, worked out once: the SQL (its rows as one JSON parameter named `param`)
    and, per column, how its value is found and prepared for the database, as the ORM would: the
    field's default where the row leaves it out, `pre_save(add=True)`, then `get_prep_value`."""

    sql: str
    columns: tuple[_Column, ...]
    attnames: frozenset[str]

    def filled(self, values: Values) -> list[Any]:
        """The row's value for each column, in column order (Python values, not yet prepared)."""
        if not self.attnames.issuperset(values):
            raise TypeError(f"not columns of this table: {sorted(set(values) - self.attnames)}")
        return [
            c.now() if c.now is not None else values[c.attname] if c.attname in values else c.default()
            for c in self.columns
        ]

    def prepared(self, filled: Sequence[Any]) -> dict[str, Any]:
        """A filled row as `{column: value}`, each value prepared by its field."""
        return {c.name: c.prep(value) for c, value in zip(self.columns, filled, strict=True)}

    def rows(self, rows: Sequence[Values]) -> list[dict[str, Any]]:
        """The rows as `{column: value}`, filled and prepared."""
        return [self.prepared(self.filled(values)) for values in rows]


def _now(field: Field[Any, Any]) -> Callable[[], Any] | None:
    """What the field's `pre_save(obj, add=True)` sets, or None where that is the value it was given."""
    pre_save = type(field).pre_save
    if pre_save is Field.pre_save:
        return None
    if isinstance(field, DateField) and pre_save in (DateField.pre_save, DateTimeField.pre_save):
        if not (field.auto_now or field.auto_now_add):
            return None
        if isinstance(field, DateTimeField):
            return timezone.now
    # Any other pre_save would need the instance: refused when the statement is built, not guessed at.
    raise TypeError(f"{field} has a pre_save the ledger statement does not reproduce")


@functools.cache
def _table(model: type[Model], param: str) -> _Table:
    """`INSERT INTO table (columns) SELECT columns FROM jsonb_populate_recordset(...)` for rows of
    `model`: all of them are ONE JSON parameter, so the statement's text and its handful of
    parameters stay the same from one request to the next (it is prepared once per connection),
    whatever the values. Postgres converts each JSON value with the column type's own input
    function: a Decimal goes as its exact text, a UUID or a timestamp as its ISO form."""
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
        columns=tuple(_Column(str(f.column), f.attname, f.get_default, _now(f), f.get_prep_value) for f in fields),
        attnames=frozenset(f.attname for f in fields),
    )


def _insert(model: type[Model], rows: Sequence[Values], param: str, params: dict[str, Any]) -> str:
    """The insert of `rows` of `model`; their values go into `params[param]`."""
    table = _table(model, param)
    params[param] = _dumps(table.rows(rows))
    return table.sql


def _record_instance(record: Sequence[Any], pk: int) -> UsageRecord:
    """The UsageRecord inserted with the id `pk` from `record` (its filled row), as the ORM would load it."""
    filled = iter(record)
    attnames, returned = _loaded_fields(UsageRecord)
    values = [pk if from_database else next(filled) for from_database in returned]
    return UsageRecord.from_db(statements.database.alias, attnames, values)


@functools.cache
def _loaded_fields(model: type[Model]) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """The model's columns as `from_db` takes them, and which of them the database fills in (the id)."""
    fields = model._meta.concrete_fields
    return tuple(f.attname for f in fields), tuple(bool(f.db_returning) for f in fields)


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
    *, record: Values, reservation: Reservation, actual_tokens: int, conversation: ConversationWrite | None
) -> tuple[str, dict[str, Any], list[Any]]:
    """The SQL and parameters that settle `reservation` to `actual_tokens`, insert `record` (a
    UsageRecord's values) and keep `conversation`, and the record's row as inserted (its values in
    column order, defaults filled); the statement returns the record's id."""
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
            _insert(Conversation, [conversation.created], "conversation", params)
        else:
            shape = "touched"
            params["conversation_id"], params["touched_at"] = conversation.conversation_id, conversation.touched_at
        _insert(Message, conversation.messages, "messages", params)
    table = _table(UsageRecord, "record")
    filled = table.filled(record)
    params["record"] = _dumps([table.prepared(filled)])
    return _statement_sql(shape), params, filled


def _saved(row: tuple[Any, ...] | None) -> int:
    if row is None:
        raise DatabaseError("the ledger statement returned no row")
    return int(row[0])


def write(
    *, record: Values, reservation: Reservation, actual_tokens: int, conversation: ConversationWrite | None
) -> UsageRecord:
    """Settle `reservation` to `actual_tokens`, insert `record` and keep `conversation`; the record as stored."""
    sql, params, row = statement(
        record=record, reservation=reservation, actual_tokens=actual_tokens, conversation=conversation
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return _record_instance(row, _saved(cursor.fetchone()))


async def awrite(
    *, record: Values, reservation: Reservation, actual_tokens: int, conversation: ConversationWrite | None
) -> UsageRecord:
    """`write` from async code, on the event loop (`chatservice.async_db`): no thread hop. The
    writes of requests that end together go in one transaction (`chatservice.statement_batches`:
    one round trip, one commit and one WAL flush for all of them; a write that fails there is
    run again alone, so it fails alone)."""
    sql, params, row = statement(
        record=record, reservation=reservation, actual_tokens=actual_tokens, conversation=conversation
    )
    batches = _batches.get(sql)
    if batches is None:
        batches = _batches[sql] = StatementBatches(sql, lock_order=quota_row)
    return _record_instance(row, _saved(await batches.fetchone(params)))


_batches: dict[str, StatementBatches] = {}  # one per statement text (three shapes)
