"""The one ledger write: a UsageRecord, the quota settled, the conversation updated — atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.db import IntegrityError, InterfaceError, OperationalError, transaction
from django.utils import timezone

from chat.models import Conversation, Message
from chatservice.async_db import statements
from chatservice.db import db_async
from usage import ledger_statement
from usage.ledger_statement import ConversationWrite, Values
from usage.models import UsageRecord
from usage.quotas import Reservation, token_settle

logger = logging.getLogger(__name__)

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


def _ledger_parts(outcome: ChatOutcome, keep_exchange: bool) -> tuple[Values, ConversationWrite | None, int]:
    record = _usage_record(outcome)
    # A request that answered (status ok) is kept even when the reply is empty: its response names
    # the conversation, which must then exist (and, when the request started it, be continuable).
    produced = bool(outcome.reply) or outcome.status == "ok"
    keep = keep_exchange and produced and outcome.conversation_id is not None
    kept = _conversation_write(outcome) if keep else None
    return record, kept, outcome.input_tokens + outcome.output_tokens


def usage_settle(*, outcome: ChatOutcome, keep_exchange: bool = True) -> UsageRecord:
    """Write the request's UsageRecord, settle its token reservation to the actual usage, and
    keep the exchange in its conversation (only when the provider produced text or the request
    succeeded, and `keep_exchange`) — all or nothing.

    On Postgres this is one statement (`usage.ledger_statement`); elsewhere one transaction.
    """
    record, kept, actual_tokens = _ledger_parts(outcome, keep_exchange)
    if outcome.reservation is not None and _settles_in_one_statement():
        return ledger_statement.write(
            record=record, reservation=outcome.reservation, actual_tokens=actual_tokens, conversation=kept
        )
    stored = UsageRecord(**record)
    with transaction.atomic():
        if outcome.reservation is not None:
            token_settle(reservation=outcome.reservation, actual_tokens=actual_tokens)
        stored.save(force_insert=True)
        if kept is not None:
            if kept.created is not None:
                Conversation(**kept.created).save(force_insert=True)
            else:  # the conversation now sorts as the most recent one
                Conversation.objects.filter(id=kept.conversation_id).update(updated_at=kept.touched_at)
            Message.objects.bulk_create([Message(**message) for message in kept.messages])
    return stored


async def usage_asettle(*, outcome: ChatOutcome, keep_exchange: bool = True) -> UsageRecord:
    """`usage_settle` from async code: on Postgres the one statement runs on the event loop, with
    no thread hop (`chatservice.async_db`); elsewhere `usage_settle` runs on the database threads."""
    if outcome.reservation is None or not _settles_in_one_statement():
        return await db_async(usage_settle)(outcome=outcome, keep_exchange=keep_exchange)
    record, kept, actual_tokens = _ledger_parts(outcome, keep_exchange)
    return await ledger_statement.awrite(
        record=record, reservation=outcome.reservation, actual_tokens=actual_tokens, conversation=kept
    )


async def usage_write(outcome: ChatOutcome) -> UsageRecord:
    """`usage_settle` from async code, once more on a fresh connection if the pooled one broke (a database restart).

    The write is one statement or one transaction, so a failed try left nothing; if the
    connection broke after the commit, the retry meets the record's unique request_id.
    """
    try:
        return await _usage_write_once(outcome)
    except (OperationalError, InterfaceError) as exc:
        logger.warning("the ledger write failed (%s); retrying on a fresh connection", exc)
    return await _usage_write_once(outcome)


async def _usage_write_once(outcome: ChatOutcome) -> UsageRecord:
    try:
        return await usage_asettle(outcome=outcome)
    except IntegrityError:
        existing = await db_async(UsageRecord.objects.filter(request_id=outcome.request_id).first)()
        if existing is not None:
            if existing.user_id == outcome.user_id and existing.created_at == outcome.created_at:
                return existing  # an earlier try committed before its connection broke
            # The id is another request's: a client sent an X-Request-ID that is already in the
            # ledger (a retry with the same id, or someone else's). This request's usage is still
            # owed, its reservation still held and its conversation still to keep: it is recorded
            # under an id of its own.
            fresh = dataclasses.replace(outcome, request_id=uuid.uuid4())
            logger.warning(
                "the request id is already in the ledger; the usage is recorded under %s",
                fresh.request_id,
                extra={"request_id": str(outcome.request_id)},
            )
            return await _usage_write_once(fresh)
    # A row the write refers to was deleted while the reply was generated (the conversation by its
    # user, or the API key by an operator): the usage is still owed, so it is recorded without the
    # exchange, and without the key only when that is what is gone (a deleted conversation must
    # not cost the record its key).
    logger.warning(
        "the conversation or the API key of the request is gone; the usage is recorded without them",
        extra={"request_id": str(outcome.request_id)},
    )
    if outcome.api_key_id is not None:
        with contextlib.suppress(IntegrityError):
            return await usage_asettle(outcome=outcome, keep_exchange=False)
    return await usage_asettle(outcome=dataclasses.replace(outcome, api_key_id=None), keep_exchange=False)


def _settles_in_one_statement() -> bool:
    return statements.available


def _usage_record(outcome: ChatOutcome) -> Values:
    """The request's UsageRecord, as its field values (a model instance is made only once it is stored)."""
    return {
        "request_id": outcome.request_id,
        "created_at": outcome.created_at,
        "user_id": outcome.user_id,
        "api_key_id": outcome.api_key_id,
        "plan": outcome.plan,
        "conversation_id": outcome.conversation_id,
        "transport": outcome.transport,
        "provider": outcome.provider,
        "model": outcome.model,
        "input_tokens": outcome.input_tokens,
        "cached_input_tokens": outcome.cached_input_tokens,
        "output_tokens": outcome.output_tokens,
        "cost": outcome.cost,
        "input_price": outcome.input_price,
        "cached_input_price": outcome.cached_input_price,
        "output_price": outcome.output_price,
        "latency_ms": outcome.latency_ms,
        "time_to_first_token_ms": outcome.time_to_first_token_ms,
        "status": outcome.status,
        "usage_source": outcome.usage_source,
        "fallback_path": outcome.fallback_path,
        "attempts": outcome.attempts,
        "error_code": outcome.error_code,
        "flagged": outcome.flagged,
    }


def _conversation_write(outcome: ChatOutcome) -> ConversationWrite:
    assert outcome.conversation_id is not None
    now = timezone.now()
    created = None
    if outcome.new_conversation:
        created = {
            "id": outcome.conversation_id,
            "user_id": outcome.user_id,
            "title": " ".join(outcome.user_message.split())[:TITLE_CHARS],
            "system_prompt": outcome.system_prompt,
        }
    messages = [
        {
            "conversation_id": outcome.conversation_id,
            "role": Message.Role.USER,
            "content": outcome.user_message,
            "request_id": outcome.request_id,
        },
        {
            "conversation_id": outcome.conversation_id,
            "role": Message.Role.ASSISTANT,
            "content": outcome.reply,
            "request_id": outcome.request_id,
            "provider": outcome.provider,
            "model": outcome.model,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "cost": outcome.cost,
            "incomplete": outcome.status != "ok",
        },
    ]
    return ConversationWrite(
        conversation_id=outcome.conversation_id, created=created, touched_at=now, messages=messages
    )
