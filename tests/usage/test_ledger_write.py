"""`usage_settle`, the one ledger write: the record, the settled reservation and the conversation, all or nothing.

On Postgres the record and the settlement are one statement; these tests read the rows back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import IntegrityError
from django.db.models import F
from django.utils import timezone

from accounts.services import user_get_or_create
from chat.models import Conversation, Message
from usage.models import DailyTokenUsage, TokenReservation, UsageRecord
from usage.quotas import Reservation, reservations_reap, token_reserve
from usage.services import ChatOutcome, usage_settle

NOON = datetime(2031, 3, 14, 12, 0, tzinfo=UTC)
pytestmark = pytest.mark.django_db


@pytest.fixture(params=["one statement", "statement by statement"])
def user_id(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Each test runs on both write paths: Postgres' single statement and the portable one (SQLite)."""
    if request.param != "one statement":
        monkeypatch.setattr("usage.services._settles_in_one_statement", lambda: False)
    user, _ = user_get_or_create(username="ledger-user", plan_name="premium")
    return user.pk


def _outcome(user_id: int, reservation: Reservation | None, **changes: object) -> ChatOutcome:
    outcome = ChatOutcome(
        request_id=uuid.uuid4(),
        created_at=NOON,
        user_id=user_id,
        api_key_id=None,
        plan="premium",
        transport="v1",
        conversation_id=None,
        new_conversation=False,
        user_message="hello",
        system_prompt="",
        reply="hi there",
        provider="openai",
        model="gpt-4o-mini",
        input_tokens=12,
        cached_input_tokens=4,
        output_tokens=30,
        cost=Decimal("0.000123456789"),
        input_price=Decimal("0.150000"),
        cached_input_price=Decimal("0.075000"),
        output_price=Decimal("0.600000"),
        latency_ms=321,
        time_to_first_token_ms=45,
        status="ok",
        usage_source="provider",
        fallback_path=["deepseek", "openai"],
        attempts=2,
        error_code="",
        flagged=True,
        reservation=reservation,
    )
    return dataclasses.replace(outcome, **changes)  # type: ignore[arg-type]


def _row(user_id: int) -> tuple[int, int]:
    row = DailyTokenUsage.objects.filter(user_id=user_id, day=NOON.date()).first()
    return (row.used, row.reserved) if row else (0, 0)


def test_the_record_holds_every_field_and_the_reservation_becomes_usage(user_id: int) -> None:
    other = token_reserve(user_id=user_id, limit=10_000, tokens=500, now=NOON)
    mine = token_reserve(user_id=user_id, limit=10_000, tokens=100, now=NOON)
    outcome = _outcome(user_id, mine)

    returned = usage_settle(outcome=outcome)

    assert _row(user_id) == (42, 500)  # 12 + 30 used; only the other request's tokens stay reserved
    assert list(TokenReservation.objects.filter(user_id=user_id).values_list("id", flat=True)) == [other.id]
    stored = UsageRecord.objects.get(request_id=outcome.request_id)
    assert returned.pk == stored.pk and not returned._state.adding
    fields = UsageRecord._meta.concrete_fields
    assert {f.attname: getattr(returned, f.attname) for f in fields} == {
        f.attname: getattr(stored, f.attname) for f in fields
    }
    expected = {
        f.name: getattr(outcome, f.name)
        for f in dataclasses.fields(ChatOutcome)
        if f.name not in {"new_conversation", "user_message", "system_prompt", "reply", "reservation"}
    }
    actual = {name: getattr(stored, name if name not in {"user", "api_key"} else f"{name}_id") for name in expected}
    assert actual == expected


def test_a_reaped_reservation_only_adds_usage(user_id: int) -> None:
    reservation = token_reserve(user_id=user_id, limit=10_000, tokens=300, now=NOON)
    assert reservations_reap(now=NOON + timedelta(days=1)) == 1
    kept = token_reserve(user_id=user_id, limit=10_000, tokens=70, now=NOON)

    usage_settle(outcome=_outcome(user_id, reservation, input_tokens=100, output_tokens=180))

    assert _row(user_id) == (280, 70)  # the other reservation is untouched
    assert TokenReservation.objects.filter(id=kept.id).exists()


@pytest.mark.django_db(transaction=True)
def test_a_write_racing_the_reaper_for_its_reservation_does_not_deadlock(user_id: int) -> None:
    """The reaper deletes a reservation, then updates its day row (`_reap_rows`); a request
    settling that reservation meanwhile must take the rows in the same order (the reservation,
    then the day row), or each waits for the other until Postgres fails one as a deadlock."""
    import threading
    import time

    from django.db import connection, connections, transaction

    reservation = token_reserve(user_id=user_id, limit=10_000, tokens=300, now=NOON)
    errors: list[BaseException] = []

    def settle() -> None:
        try:
            usage_settle(outcome=_outcome(user_id, reservation))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    settler = threading.Thread(target=settle)
    with transaction.atomic():  # the reaper's transaction, paused between its two steps
        assert TokenReservation.objects.filter(pk=reservation.id).delete()[0] == 1
        settler.start()
        deadline = time.monotonic() + 5
        with connection.cursor() as cursor:  # until the settlement waits for a lock the reaper holds
            while time.monotonic() < deadline:
                cursor.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND pg_backend_pid() = ANY(pg_blocking_pids(pid))"
                )
                if cursor.fetchone()[0]:
                    break
                time.sleep(0.01)
        DailyTokenUsage.objects.filter(user_id=user_id, day=NOON.date()).update(reserved=F("reserved") - 300)
    settler.join(timeout=10)

    assert errors == []
    assert _row(user_id) == (42, 0)  # reaped once, the usage added once
    assert UsageRecord.objects.filter(user_id=user_id).count() == 1


def test_a_deleted_day_row_is_recreated_with_the_usage(user_id: int) -> None:
    reservation = token_reserve(user_id=user_id, limit=10_000, tokens=300, now=NOON)
    DailyTokenUsage.objects.filter(user_id=user_id).delete()  # an operator cleared it

    usage_settle(outcome=_outcome(user_id, reservation))

    assert _row(user_id) == (42, 0)
    assert UsageRecord.objects.filter(user_id=user_id).count() == 1


def test_a_failed_request_without_a_reservation_is_still_recorded(user_id: int) -> None:
    outcome = _outcome(user_id, None, reply="", input_tokens=0, output_tokens=0, status="failed", error_code="x")
    usage_settle(outcome=outcome)
    assert UsageRecord.objects.get(request_id=outcome.request_id).status == "failed"
    assert _row(user_id) == (0, 0)


def test_the_conversation_is_kept_in_the_same_write(user_id: int) -> None:
    reservation = token_reserve(user_id=user_id, limit=10_000, tokens=100, now=NOON)
    conversation_id = uuid.uuid4()
    outcome = _outcome(user_id, reservation, transport="rest", conversation_id=conversation_id, new_conversation=True)

    usage_settle(outcome=outcome)

    assert Conversation.objects.get(id=conversation_id).user_id == user_id
    messages = Message.objects.filter(conversation_id=conversation_id).order_by("role")
    assert [(m.role, m.content) for m in messages] == [("assistant", "hi there"), ("user", "hello")]
    assert _row(user_id) == (42, 0)


@pytest.mark.django_db(transaction=True)  # autocommit, as the service runs: the failed write is all that rolls back
def test_nothing_is_half_written_when_the_conversation_write_fails(user_id: int) -> None:
    first = token_reserve(user_id=user_id, limit=10_000, tokens=100, now=NOON)
    conversation_id = uuid.uuid4()
    usage_settle(
        outcome=_outcome(user_id, first, transport="rest", conversation_id=conversation_id, new_conversation=True)
    )
    second = token_reserve(user_id=user_id, limit=10_000, tokens=100, now=NOON)
    # Creating the same conversation again violates its primary key: the whole write must roll back.
    clash = _outcome(user_id, second, transport="rest", conversation_id=conversation_id, new_conversation=True)

    with pytest.raises(IntegrityError):
        usage_settle(outcome=clash)

    assert not UsageRecord.objects.filter(request_id=clash.request_id).exists()
    assert TokenReservation.objects.filter(id=second.id).exists()
    assert _row(user_id) == (42, 100)


def test_a_follow_up_touches_its_conversation_and_adds_two_messages(user_id: int) -> None:
    conversation_id = uuid.uuid4()
    first = token_reserve(user_id=user_id, limit=10_000, tokens=100, now=NOON)
    usage_settle(
        outcome=_outcome(user_id, first, transport="rest", conversation_id=conversation_id, new_conversation=True)
    )
    before = Conversation.objects.get(id=conversation_id).updated_at
    second = token_reserve(user_id=user_id, limit=10_000, tokens=100, now=NOON)

    usage_settle(
        outcome=_outcome(
            user_id, second, transport="rest", conversation_id=conversation_id, user_message="again", reply="sure"
        )
    )

    conversation = Conversation.objects.get(id=conversation_id)
    assert conversation.updated_at > before and conversation.title == "hello"
    contents = list(Message.objects.filter(conversation_id=conversation_id).values_list("role", "content"))
    assert contents == [("user", "hello"), ("assistant", "hi there"), ("user", "again"), ("assistant", "sure")]
    assert _row(user_id) == (84, 0)


@pytest.mark.django_db(transaction=True)
async def test_a_conversation_deleted_mid_request_still_gets_its_usage_recorded(
    user_id: int, caplog: pytest.LogCaptureFixture
) -> None:
    from channels.db import database_sync_to_async as sync_to_async  # closes its connection after each call

    from usage.services import usage_write

    conversation_id = uuid.uuid4()
    first = await sync_to_async(token_reserve)(user_id=user_id, limit=10_000, tokens=100, now=NOON)
    await sync_to_async(usage_settle)(
        outcome=_outcome(user_id, first, transport="rest", conversation_id=conversation_id, new_conversation=True)
    )
    second = await sync_to_async(token_reserve)(user_id=user_id, limit=10_000, tokens=100, now=NOON)
    follow_up = _outcome(user_id, second, transport="rest", conversation_id=conversation_id, reply="late")
    await sync_to_async(Conversation.objects.filter(id=conversation_id).delete)()  # the user deletes it meanwhile

    record = await usage_write(follow_up)

    assert record.request_id == follow_up.request_id and record.conversation_id == conversation_id
    assert await sync_to_async(_row)(user_id) == (84, 0)  # both requests' usage, nothing left reserved
    assert not await sync_to_async(Message.objects.filter(conversation_id=conversation_id).exists)()
    assert any("is gone" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db(transaction=True)
async def test_an_api_key_deleted_mid_request_still_gets_its_usage_recorded(user_id: int) -> None:
    from channels.db import database_sync_to_async as sync_to_async

    from accounts.models import ApiKey, User
    from accounts.services import api_key_create
    from usage.services import usage_write

    user = await sync_to_async(User.objects.get)(pk=user_id)
    key = (await sync_to_async(api_key_create)(user=user)).api_key
    reservation = await sync_to_async(token_reserve)(user_id=user_id, limit=10_000, tokens=100, now=NOON)
    outcome = _outcome(user_id, reservation, api_key_id=key.pk)
    await sync_to_async(ApiKey.objects.filter(pk=key.pk).delete)()  # an operator deletes the key meanwhile

    record = await usage_write(outcome)

    assert record.request_id == outcome.request_id and record.api_key_id is None
    assert await sync_to_async(_row)(user_id) == (42, 0)


@pytest.mark.django_db(transaction=True)
async def test_requests_that_end_together_are_written_together_and_a_bad_write_fails_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twenty ledger writes at once on Postgres go in few transactions; the one whose API key
    was deleted fails its batch, and is the only one recorded without its key and exchange."""
    from channels.db import database_sync_to_async as sync_to_async

    from chatservice.async_db import statements
    from usage.services import usage_write

    user, _ = await sync_to_async(user_get_or_create)(username="batch-user", plan_name="premium")
    user_id = user.pk
    batches: list[int] = []
    fetchone_each = statements.fetchone_each

    async def spy(sql: str, params: list, *, synchronous_commit: bool = True) -> list:
        batches.append(len(params))
        return await fetchone_each(sql, params, synchronous_commit=synchronous_commit)

    monkeypatch.setattr(statements, "fetchone_each", spy)
    reservations = [
        await sync_to_async(token_reserve)(user_id=user_id, limit=10_000, tokens=100, now=NOON) for _ in range(20)
    ]
    outcomes = [_outcome(user_id, r, conversation_id=uuid.uuid4(), new_conversation=True) for r in reservations]
    outcomes[7] = dataclasses.replace(outcomes[7], api_key_id=2_000_000_000)  # no such key (any more)

    records = await asyncio.gather(*(usage_write(o) for o in outcomes))

    assert [r.request_id for r in records] == [o.request_id for o in outcomes]
    assert max(batches) >= 10 and len(batches) < 20  # mostly together; the failed batch then ran one by one
    assert await sync_to_async(_row)(user_id) == (20 * 42, 0)  # every request's usage, nothing held
    kept = await sync_to_async(lambda: set(Conversation.objects.filter(user_id=user_id).values_list("id", flat=True)))()
    assert kept == {o.conversation_id for i, o in enumerate(outcomes) if i != 7}


def test_a_new_conversation_and_its_messages_get_their_defaults_and_the_time_of_the_write(user_id: int) -> None:
    reservation = token_reserve(user_id=user_id, limit=10_000, tokens=100, now=NOON)
    conversation_id = uuid.uuid4()
    before = timezone.now()

    usage_settle(outcome=_outcome(user_id, reservation, conversation_id=conversation_id, new_conversation=True))

    after = timezone.now()
    conversation = Conversation.objects.get(pk=conversation_id)
    assert before <= conversation.created_at <= conversation.updated_at <= after
    asked, answered = Message.objects.filter(conversation_id=conversation_id).order_by("id")
    # The user's message names none of these fields: each takes its model default, as a saved instance's would.
    assert (asked.provider, asked.model, asked.input_tokens, asked.output_tokens) == ("", "", 0, 0)
    assert (asked.cost, asked.incomplete) == (Decimal(0), False)
    assert (answered.provider, answered.input_tokens, answered.cost) == ("openai", 12, Decimal("0.000123456789"))
    assert before <= asked.created_at <= answered.created_at <= after


def test_a_ledger_row_naming_a_field_its_table_does_not_have_is_refused() -> None:
    from usage.ledger_statement import _table

    with pytest.raises(TypeError, match="titel"):
        _table(Conversation, "conversation").rows([{"id": uuid.uuid4(), "user_id": 1, "titel": "typo"}])


def test_a_field_whose_pre_save_the_statement_cannot_reproduce_is_refused() -> None:
    from django.db import models

    from usage.ledger_statement import _now

    assert _now(models.CharField(max_length=5)) is None
    assert _now(models.DateTimeField()) is None  # a plain date keeps the value it was given
    assert _now(models.DateTimeField(auto_now_add=True)) is timezone.now
    assert _now(models.DateTimeField(auto_now=True)) is timezone.now
    for field in (models.FileField(upload_to="x"), models.DateField(auto_now=True)):
        with pytest.raises(TypeError, match="pre_save"):
            _now(field)
