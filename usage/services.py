"""The one ledger write: a UsageRecord, the quota settled, the conversation updated — atomically."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from chat.models import Conversation, Message
from usage.models import UsageRecord
from usage.quotas import Reservation, token_settle

TITLE_CHARS = 80


@dataclass(frozen=True)
class ChatOutcome:
    """Everything known about a finished request, however it ended."""

    request_id: uuid.UUID
    created_at: datetime
    user_id: int
    api_key_id: int | None
    plan: str
    transport: str
    conversation_id: uuid.UUID | None  # None: nothing is kept in a conversation (the /v1 API)
    new_conversation: bool
    user_message: str
    system_prompt: str
    reply: str
    provider: str
    model: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost: Decimal
    input_price: Decimal | None
    cached_input_price: Decimal | None
    output_price: Decimal | None
    latency_ms: int
    time_to_first_token_ms: int | None
    status: str
    usage_source: str
    fallback_path: list[str] = field(default_factory=list)
    attempts: int = 0
    error_code: str = ""
    flagged: bool = False
    reservation: Reservation | None = None


def usage_settle(*, outcome: ChatOutcome) -> UsageRecord:
    """Write the request's UsageRecord, settle its token reservation to the actual usage, and
    keep the exchange in its conversation (only when the provider produced text) — one transaction.

    On Postgres the record and the settlement are one statement; with nothing to keep in a
    conversation (the /v1 API, a failed request) that statement is the whole write.
    """
    record = _usage_record(outcome)
    keep = bool(outcome.reply) and outcome.conversation_id is not None
    if outcome.reservation is not None and _settles_in_one_statement():
        with transaction.atomic() if keep else contextlib.nullcontext():
            _record_and_settle(record, outcome.reservation, outcome.input_tokens + outcome.output_tokens)
            if keep:
                _conversation_append(outcome)
        return record
    with transaction.atomic():
        if outcome.reservation is not None:
            token_settle(reservation=outcome.reservation, actual_tokens=outcome.input_tokens + outcome.output_tokens)
        record.save(force_insert=True)
        if keep:
            _conversation_append(outcome)
    return record


def _settles_in_one_statement() -> bool:
    return connection.vendor == "postgresql"


def _usage_record(outcome: ChatOutcome) -> UsageRecord:
    return UsageRecord(
        request_id=outcome.request_id,
        created_at=outcome.created_at,
        user_id=outcome.user_id,
        api_key_id=outcome.api_key_id,
        plan=outcome.plan,
        conversation_id=outcome.conversation_id,
        transport=outcome.transport,
        provider=outcome.provider,
        model=outcome.model,
        input_tokens=outcome.input_tokens,
        cached_input_tokens=outcome.cached_input_tokens,
        output_tokens=outcome.output_tokens,
        cost=outcome.cost,
        input_price=outcome.input_price,
        cached_input_price=outcome.cached_input_price,
        output_price=outcome.output_price,
        latency_ms=outcome.latency_ms,
        time_to_first_token_ms=outcome.time_to_first_token_ms,
        status=outcome.status,
        usage_source=outcome.usage_source,
        fallback_path=outcome.fallback_path,
        attempts=outcome.attempts,
        error_code=outcome.error_code,
        flagged=outcome.flagged,
    )


# The reservation deleted, the day's row settled (created if an operator deleted it) and the
# record inserted in ONE statement: atomic on its own, one round trip. Every data-modifying
# CTE runs to completion whether or not the main statement reads it.
_SETTLE_SQL = """
WITH held AS (
    DELETE FROM usage_tokenreservation WHERE id = %(reservation_id)s RETURNING tokens
), day_row AS (
    INSERT INTO usage_dailytokenusage (user_id, day, used, reserved)
    VALUES (%(user_id)s, %(day)s, %(actual)s, 0)
    ON CONFLICT (user_id, day) DO UPDATE
        SET used = usage_dailytokenusage.used + EXCLUDED.used,
            reserved = usage_dailytokenusage.reserved - COALESCE((SELECT SUM(tokens) FROM held), 0)
)
INSERT INTO {table} ({columns}) VALUES ({values}) RETURNING {pk}
"""


def _record_and_settle(record: UsageRecord, reservation: Reservation, actual_tokens: int) -> None:
    if actual_tokens < 0:
        raise ValueError("actual_tokens must be >= 0")
    fields = [f for f in UsageRecord._meta.concrete_fields if not f.primary_key]
    names = [f"f{i}" for i in range(len(fields))]
    sql = _SETTLE_SQL.format(
        table=connection.ops.quote_name(UsageRecord._meta.db_table),
        columns=", ".join(connection.ops.quote_name(str(f.column)) for f in fields),
        values=", ".join(f"%({name})s" for name in names),
        pk=connection.ops.quote_name(str(UsageRecord._meta.pk.column)),
    )
    params: dict[str, Any] = {
        "reservation_id": reservation.id,
        "user_id": reservation.user_id,
        "day": reservation.day,
        "actual": actual_tokens,
    }
    for name, f in zip(names, fields, strict=True):
        params[name] = f.get_db_prep_save(f.pre_save(record, add=True), connection)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        (record.pk,) = cursor.fetchone()
    record._state.adding = False
    record._state.db = connection.alias


def _conversation_append(outcome: ChatOutcome) -> None:
    assert outcome.conversation_id is not None
    if outcome.new_conversation:
        Conversation.objects.create(
            id=outcome.conversation_id,
            user_id=outcome.user_id,
            title=" ".join(outcome.user_message.split())[:TITLE_CHARS],
            system_prompt=outcome.system_prompt,
        )
    else:
        # The conversation now sorts as the most recent one.
        Conversation.objects.filter(id=outcome.conversation_id).update(updated_at=timezone.now())
    Message.objects.bulk_create(
        [
            Message(
                conversation_id=outcome.conversation_id,
                role=Message.Role.USER,
                content=outcome.user_message,
                request_id=outcome.request_id,
            ),
            Message(
                conversation_id=outcome.conversation_id,
                role=Message.Role.ASSISTANT,
                content=outcome.reply,
                request_id=outcome.request_id,
                provider=outcome.provider,
                model=outcome.model,
                input_tokens=outcome.input_tokens,
                output_tokens=outcome.output_tokens,
                cost=outcome.cost,
                incomplete=outcome.status != "ok",
            ),
        ]
    )
