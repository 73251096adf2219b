"""Daily token quotas: the guarded reservation, settle/release/reap, refusals and the UTC day."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from django.core.management import call_command
from django.db import transaction
from django.db.transaction import TransactionManagementError

from accounts.services import user_get_or_create
from chatservice.errors import ServiceError
from usage.models import DailyTokenUsage, TokenReservation
from usage.quotas import (
    QuotaState,
    quota_state,
    reservations_reap,
    seconds_until_next_day,
    token_release,
    token_reserve,
    token_settle,
)

NOON = datetime(2031, 3, 14, 12, 0, tzinfo=UTC)
pytestmark = pytest.mark.django_db


@pytest.fixture
def user_id() -> int:
    user, _ = user_get_or_create(username="quota-user", plan_name="free")
    return user.pk


def _row(user_id: int, day: datetime = NOON) -> tuple[int, int]:
    row = DailyTokenUsage.objects.filter(user_id=user_id, day=day.date()).first()
    return (row.used, row.reserved) if row else (0, 0)  # no reservation ever fitted: no row


def test_reserve_holds_tokens_and_records_a_reservation(user_id: int, settings: object) -> None:
    settings.TOKEN_RESERVATION_TTL_SECONDS = 120  # type: ignore[attr-defined]
    reservation = token_reserve(user_id=user_id, limit=1000, tokens=300, now=NOON)
    assert (reservation.user_id, reservation.day, reservation.tokens) == (user_id, NOON.date(), 300)
    assert _row(user_id) == (0, 300)
    row = TokenReservation.objects.get(pk=reservation.id)
    assert (row.tokens, row.day, row.expires_at) == (300, NOON.date(), NOON + timedelta(seconds=120))


def test_quota_fits_exactly_then_refuses_with_details_and_headers(user_id: int, settings: object) -> None:
    settings.TOKEN_RESERVATION_TTL_SECONDS = 86_400  # type: ignore[attr-defined]
    token_reserve(user_id=user_id, limit=1000, tokens=600, now=NOON)
    token_reserve(user_id=user_id, limit=1000, tokens=400, now=NOON)  # exactly the limit
    at = datetime(2031, 3, 14, 23, 59, 29, 500_000, tzinfo=UTC)
    with pytest.raises(ServiceError) as refused:
        token_reserve(user_id=user_id, limit=1000, tokens=1, now=at)
    error = refused.value
    assert (error.code, error.status) == ("token_quota_exceeded", 429)
    assert error.details == {"limit": 1000, "used": 0, "reserved": 1000, "requested": 1}
    assert error.headers == {
        "Retry-After": "31",  # 30.5 s to midnight, rounded up
        "X-RateLimit-Limit": "1000",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "31",
    }
    assert _row(user_id) == (0, 1000)
    assert TokenReservation.objects.filter(user_id=user_id).count() == 2


def test_a_request_larger_than_the_whole_quota_is_refused(user_id: int) -> None:
    with pytest.raises(ServiceError) as refused:
        token_reserve(user_id=user_id, limit=100, tokens=101, now=NOON)
    assert refused.value.details["requested"] == 101
    assert refused.value.headers["X-RateLimit-Remaining"] == "100"
    assert _row(user_id) == (0, 0)


def test_negative_tokens_are_a_bug(user_id: int) -> None:
    with pytest.raises(ValueError):
        token_reserve(user_id=user_id, limit=100, tokens=-1, now=NOON)


def test_settle_moves_reserved_to_actual_use(user_id: int) -> None:
    first = token_reserve(user_id=user_id, limit=1000, tokens=300, now=NOON)
    second = token_reserve(user_id=user_id, limit=1000, tokens=200, now=NOON)
    with transaction.atomic():
        token_settle(reservation=first, actual_tokens=120)
    assert _row(user_id) == (120, 200)
    with transaction.atomic():
        token_settle(reservation=second, actual_tokens=250)  # more than estimated: usage is what it was
    assert _row(user_id) == (370, 0)
    assert not TokenReservation.objects.filter(user_id=user_id).exists()
    state = quota_state(user_id=user_id, limit=1000, now=NOON)
    assert state == QuotaState(limit=1000, used=370, reserved=0, remaining=630, reset_seconds=12 * 3600)


def test_settle_counts_on_the_reservation_day(user_id: int) -> None:
    late = datetime(2031, 3, 14, 23, 59, 59, tzinfo=UTC)
    reservation = token_reserve(user_id=user_id, limit=1000, tokens=500, now=late)
    with transaction.atomic():
        token_settle(reservation=reservation, actual_tokens=400)  # settled after midnight
    assert _row(user_id, late) == (400, 0)
    assert not DailyTokenUsage.objects.filter(user_id=user_id, day=late.date() + timedelta(days=1)).exists()


def test_settle_after_reap_only_adds_usage(user_id: int) -> None:
    reservation = token_reserve(user_id=user_id, limit=1000, tokens=300, now=NOON)
    assert reservations_reap(now=NOON + timedelta(days=1)) == 1
    assert _row(user_id) == (0, 0)
    with transaction.atomic():
        token_settle(reservation=reservation, actual_tokens=280)
    assert _row(user_id) == (280, 0)


def test_release_returns_the_tokens_once(user_id: int) -> None:
    kept = token_reserve(user_id=user_id, limit=1000, tokens=100, now=NOON)
    released = token_reserve(user_id=user_id, limit=1000, tokens=300, now=NOON)
    token_release(reservation=released)
    token_release(reservation=released)
    assert _row(user_id) == (0, 100)
    assert list(TokenReservation.objects.values_list("id", flat=True)) == [kept.id]


def test_reap_returns_only_expired_reservations(user_id: int, settings: object) -> None:
    settings.TOKEN_RESERVATION_TTL_SECONDS = 60  # type: ignore[attr-defined]
    other, _ = user_get_or_create(username="quota-other")
    token_reserve(user_id=user_id, limit=1000, tokens=100, now=NOON)
    token_reserve(user_id=other.pk, limit=1000, tokens=40, now=NOON)
    fresh = token_reserve(user_id=user_id, limit=1000, tokens=7, now=NOON + timedelta(seconds=30))
    assert reservations_reap(now=NOON + timedelta(seconds=60)) == 2  # expires_at <= now is expired
    assert _row(user_id) == (0, 7)
    assert _row(other.pk) == (0, 0)
    assert list(TokenReservation.objects.values_list("id", flat=True)) == [fresh.id]
    assert reservations_reap(now=NOON + timedelta(seconds=60)) == 0


def test_reap_command_prints_how_many(user_id: int, settings: object) -> None:
    settings.TOKEN_RESERVATION_TTL_SECONDS = 1  # type: ignore[attr-defined]
    past = datetime.now(UTC) - timedelta(minutes=5)
    token_reserve(user_id=user_id, limit=1000, tokens=10, now=past)
    token_reserve(user_id=user_id, limit=1000, tokens=20, now=past)
    out = StringIO()
    call_command("reapreservations", stdout=out)
    assert out.getvalue().strip() == "Reaped 2 expired reservation(s)."
    assert _row(user_id, past) == (0, 0)


def test_reap_command_without_a_database_fails_cleanly() -> None:
    """The reaper runs every five minutes (docker-compose): a database that is down is one line
    saying so and a non-zero exit, not a traceback in the log each time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": f"postgres://postgres@127.0.0.1:{closed}/nowhere"}
    done = subprocess.run(
        [sys.executable, "manage.py", "reapreservations"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "database" in done.stderr and str(closed) in done.stderr


def test_reserve_reaps_the_users_expired_reservations_first(user_id: int, settings: object) -> None:
    settings.TOKEN_RESERVATION_TTL_SECONDS = 60  # type: ignore[attr-defined]
    token_reserve(user_id=user_id, limit=100, tokens=100, now=NOON)  # its process crashes
    with pytest.raises(ServiceError):
        token_reserve(user_id=user_id, limit=100, tokens=1, now=NOON + timedelta(seconds=59))
    reservation = token_reserve(user_id=user_id, limit=100, tokens=100, now=NOON + timedelta(seconds=60))
    assert _row(user_id) == (0, 100)
    assert list(TokenReservation.objects.values_list("id", flat=True)) == [reservation.id]


def test_refusal_keeps_the_reaping_it_did(user_id: int, settings: object) -> None:
    settings.TOKEN_RESERVATION_TTL_SECONDS = 60  # type: ignore[attr-defined]
    token_reserve(user_id=user_id, limit=100, tokens=30, now=NOON)
    with pytest.raises(ServiceError) as refused:
        token_reserve(user_id=user_id, limit=100, tokens=101, now=NOON + timedelta(minutes=5))
    assert refused.value.details["reserved"] == 0
    assert _row(user_id) == (0, 0)
    assert not TokenReservation.objects.exists()


def test_the_quota_resets_at_utc_midnight(user_id: int) -> None:
    before = datetime(2031, 3, 14, 23, 59, 59, 900_000, tzinfo=UTC)
    token_reserve(user_id=user_id, limit=100, tokens=100, now=before)
    with pytest.raises(ServiceError):
        token_reserve(user_id=user_id, limit=100, tokens=1, now=before)
    after = datetime(2031, 3, 15, 0, 0, tzinfo=UTC)
    reservation = token_reserve(user_id=user_id, limit=100, tokens=100, now=after)
    assert reservation.day == after.date()
    # Another timezone's clock time maps onto the same UTC day.
    eastern = after.astimezone(ZoneInfo("America/New_York"))
    with pytest.raises(ServiceError):
        token_reserve(user_id=user_id, limit=100, tokens=1, now=eastern)


def test_quota_state_for_a_day_without_a_row(user_id: int) -> None:
    assert quota_state(user_id=user_id, limit=500, now=NOON) == QuotaState(500, 0, 0, 500, 43_200)
    token_reserve(user_id=user_id, limit=500, tokens=450, now=NOON)
    with transaction.atomic():
        token_settle(
            reservation=token_reserve(user_id=user_id, limit=500, tokens=50, now=NOON),
            actual_tokens=80,
        )
    assert quota_state(user_id=user_id, limit=500, now=NOON) == QuotaState(500, 80, 450, 0, 43_200)


def test_seconds_until_next_day() -> None:
    assert seconds_until_next_day(datetime(2031, 1, 1, 0, 0, tzinfo=UTC)) == 86_400
    assert seconds_until_next_day(datetime(2031, 1, 1, 23, 59, 59, 1, tzinfo=UTC)) == 1


@pytest.mark.django_db(transaction=True)
def test_settle_outside_a_transaction_is_refused(user_id: int) -> None:
    reservation = token_reserve(user_id=user_id, limit=100, tokens=10, now=NOON)
    with pytest.raises(TransactionManagementError):
        token_settle(reservation=reservation, actual_tokens=5)
    assert _row(user_id) == (0, 10)


@pytest.mark.django_db(transaction=True)
def test_portable_reserve_keeps_the_same_guard(make_user) -> None:
    """The statement-by-statement path (SQLite in the embedded default), run here on Postgres."""
    from usage.quotas import Reservation, token_reserve_portable

    user, _ = make_user("free")
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    first = token_reserve_portable(Reservation(uuid.uuid4(), user.pk, now.date(), 60), limit=100, now=now)
    assert first.tokens == 60
    with pytest.raises(ServiceError) as refused:
        token_reserve_portable(Reservation(uuid.uuid4(), user.pk, now.date(), 41), limit=100, now=now)
    assert refused.value.code == "token_quota_exceeded" and refused.value.details["reserved"] == 60
    token_reserve_portable(Reservation(uuid.uuid4(), user.pk, now.date(), 40), limit=100, now=now)
    assert quota_state(user_id=user.pk, limit=100, now=now).remaining == 0
