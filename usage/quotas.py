"""Daily token quotas (fixed UTC day) in Postgres: reserve before the upstream call, settle or release after.

`used + reserved <= limit` is kept by one guarded UPDATE on the user's DailyTokenUsage row, so it
holds across processes and machines. A reservation is a TokenReservation row; whichever of settle,
release or reap deletes that row is the one that returns its tokens, so they are returned once.
No transaction is held across an upstream call: each function is its own short transaction, except
`token_settle`, which joins the caller's (the one that writes the UsageRecord).
"""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, F
from django.db.transaction import TransactionManagementError
from django.utils import timezone

from chatservice.async_db import statements
from chatservice.db import db_async
from chatservice.errors import ServiceError
from chatservice.statement_batches import StatementBatches
from usage.models import DailyTokenUsage, TokenReservation

_REAP_BATCH = 500


@dataclass(frozen=True, slots=True)
class Reservation:
    id: uuid.UUID
    user_id: int
    day: date
    tokens: int


@dataclass(frozen=True, slots=True)
class QuotaState:
    limit: int
    used: int
    reserved: int
    remaining: int
    reset_seconds: int  # until the next UTC midnight


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return timezone.now()
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def seconds_until_next_day(now: datetime) -> int:
    """Whole seconds (rounded up) from `now` to the next UTC midnight, when the daily quota resets."""
    now = _utc(now)
    midnight = datetime.combine(now.date() + timedelta(days=1), time.min, tzinfo=UTC)
    return max(1, math.ceil((midnight - now).total_seconds()))


def _day_row_ensure(*, user_id: int, day: date) -> None:
    """Create the user's row for `day` if missing (INSERT … ON CONFLICT DO NOTHING: safe under races)."""
    DailyTokenUsage.objects.bulk_create([DailyTokenUsage(user_id=user_id, day=day)], ignore_conflicts=True)


def _counts(*, user_id: int, day: date) -> tuple[int, int]:
    row = DailyTokenUsage.objects.filter(user_id=user_id, day=day).values_list("used", "reserved").first()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _quota_exceeded(*, limit: int, used: int, reserved: int, requested: int, now: datetime) -> ServiceError:
    reset = seconds_until_next_day(now)
    remaining = max(0, limit - used - reserved)
    return ServiceError(
        "token_quota_exceeded",
        f"The daily token quota is exhausted: {requested} tokens requested, {remaining} of {limit} left today.",
        status=429,
        details={"limit": limit, "used": used, "reserved": reserved, "requested": requested},
        headers={
            "Retry-After": str(reset),
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(reset),
        },
    )


def _reap_rows(rows: list[tuple[uuid.UUID, int, date, int]]) -> int:
    """Delete these reservations and return their tokens; rows someone else deleted first are skipped.

    Runs in the caller's transaction. Reservation rows are deleted before the day rows are updated,
    the same order settle and release use, so they cannot deadlock with each other.
    """
    freed: defaultdict[tuple[int, date], int] = defaultdict(int)
    reaped = 0
    for reservation_id, user_id, day, tokens in rows:
        deleted, _ = TokenReservation.objects.filter(pk=reservation_id).delete()
        if deleted:
            freed[(user_id, day)] += tokens
            reaped += 1
    for (user_id, day), tokens in sorted(freed.items()):
        DailyTokenUsage.objects.filter(user_id=user_id, day=day).update(reserved=F("reserved") - tokens)
    return reaped


# Postgres: the day's row is created or guarded-updated and the reservation inserted in ONE
# statement (one round trip, atomic on its own). ON CONFLICT DO UPDATE locks the row and applies
# the WHERE guard, so `used + reserved <= limit` holds however many requests race; a refused
# reservation inserts nothing and returns one row all the same, its id NULL (one row a run, so a
# batch of runs maps its rows back to them one to one).
_RESERVE_SQL = """
WITH day_row AS (
    INSERT INTO usage_dailytokenusage (user_id, day, used, reserved)
    SELECT %(user_id)s::bigint, %(day)s::date, 0, %(tokens)s::bigint WHERE %(tokens)s::bigint <= %(limit)s::bigint
    ON CONFLICT (user_id, day) DO UPDATE
        SET reserved = usage_dailytokenusage.reserved + EXCLUDED.reserved
        WHERE usage_dailytokenusage.used + usage_dailytokenusage.reserved + EXCLUDED.reserved <= %(limit)s::bigint
    RETURNING 1
),
reservation AS (
    INSERT INTO usage_tokenreservation (id, user_id, day, tokens, created_at, expires_at)
    SELECT %(id)s::uuid, %(user_id)s::bigint, %(day)s::date, %(tokens)s::bigint, %(now)s::timestamptz,
        %(expires_at)s::timestamptz
    FROM day_row
    RETURNING id
)
SELECT (SELECT id FROM reservation)
"""


def _reserve_params(reservation: Reservation, *, limit: int, now: datetime) -> dict[str, Any]:
    return {
        "id": reservation.id,
        "user_id": reservation.user_id,
        "day": reservation.day,
        "tokens": reservation.tokens,
        "limit": limit,
        "now": now,
        "expires_at": now + timedelta(seconds=settings.TOKEN_RESERVATION_TTL_SECONDS),
    }


def _reserve_in_one_statement(reservation: Reservation, *, limit: int, now: datetime) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(_RESERVE_SQL, _reserve_params(reservation, limit=limit, now=now))
        row = cursor.fetchone()
        return row is not None and row[0] is not None


def _reap_expired_for(*, user_id: int, day: date, now: datetime) -> int:
    with transaction.atomic():
        expired = TokenReservation.objects.filter(user_id=user_id, day=day, expires_at__lte=now)
        return _reap_rows(list(expired.values_list("id", "user_id", "day", "tokens")))


def token_reserve(*, user_id: int, limit: int, tokens: int, now: datetime | None = None) -> Reservation:
    """Hold `tokens` of today's (UTC) quota for one request, or raise 429 `token_quota_exceeded`.

    When the quota would refuse, the same user's expired reservations for today are reaped and
    the reservation tried once more, so a crashed request's tokens come back without waiting for
    the `reapreservations` command. On Postgres the common case is a single statement.
    """
    if tokens < 0:
        raise ValueError("tokens must be >= 0")
    now = _utc(now)
    day = now.date()
    reservation = Reservation(id=uuid.uuid4(), user_id=user_id, day=day, tokens=tokens)
    if connection.vendor != "postgresql":
        return token_reserve_portable(reservation, limit=limit, now=now)
    if _reserve_in_one_statement(reservation, limit=limit, now=now):
        return reservation
    used, reserved, expired = _refusal_state(user_id=user_id, day=day, now=now)
    if expired:
        if _reap_expired_for(user_id=user_id, day=day, now=now) and _reserve_in_one_statement(
            reservation, limit=limit, now=now
        ):
            return reservation
        used, reserved = _counts(user_id=user_id, day=day)
    raise _quota_exceeded(limit=limit, used=used, reserved=reserved, requested=tokens, now=now)


async def token_areserve(*, user_id: int, limit: int, tokens: int) -> Reservation:
    """`token_reserve` from async code. On Postgres the common case, an admitted request, is the
    one statement run on the event loop (`chatservice.async_db`: no thread hop), together with
    the reservations of the other requests that arrived meanwhile (`_reservations`: one round
    trip and one commit for a burst); a refusal, and every other database, goes through
    `token_reserve` on the database threads, which reaps expired reservations, tries again and
    says why it refuses.

    The reservations commit without waiting for their WAL flush (`synchronous_commit` off for
    them alone). Every request of a user updates that user's day row, and a commit that waits
    for the disk holds the row's lock meanwhile, so concurrent requests of one user queued
    behind each other's flushes. What it risks is narrow: a hold is admission state, not money.
    The ledger statement that settles it commits synchronously, and WAL is replayed in order,
    so a settled hold is always on disk; a database crash can lose only holds of requests still
    in flight, whose settlement then adds their usage all the same (it returns only what it
    finds held). Until those settle, the day's quota may admit up to their estimates more: the
    same bound as a reservation reaped after its TTL."""
    if tokens < 0:
        raise ValueError("tokens must be >= 0")
    if statements.available:
        now = timezone.now()
        reservation = Reservation(id=uuid.uuid4(), user_id=user_id, day=now.date(), tokens=tokens)
        row = await _reservations.fetchone(_reserve_params(reservation, limit=limit, now=now))
        if row is not None and row[0] is not None:  # the statement's one row: the reservation's id, or NULL
            return reservation
    return await db_async(token_reserve)(user_id=user_id, limit=limit, tokens=tokens)


async def _release_abandoned(params: Mapping[str, Any], row: tuple[Any, ...] | None) -> None:
    """A reservation whose request was cancelled while it was on its way goes back: the one it
    made, or, when the statement was interrupted (`row` unknown), the one it may have made
    (releasing a reservation that does not exist changes nothing)."""
    reservation = Reservation(id=params["id"], user_id=params["user_id"], day=params["day"], tokens=params["tokens"])
    await db_async(token_release)(reservation=reservation)


def quota_row(params: Mapping[str, Any]) -> tuple[int, date]:
    """The quota row a reservation or a ledger write locks: batches of them lock in this order."""
    return params["user_id"], params["day"]


_reservations = StatementBatches(
    _RESERVE_SQL, synchronous_commit=False, on_abandoned=_release_abandoned, lock_order=quota_row
)


def _refusal_state(*, user_id: int, day: date, now: datetime) -> tuple[int, int, bool]:
    """(used, reserved, any reservation expired) of the user's day, in one query, for a refusal."""
    expired = TokenReservation.objects.filter(user_id=user_id, day=day, expires_at__lte=now)
    row = (
        DailyTokenUsage.objects.filter(user_id=user_id, day=day)
        .annotate(expired=Exists(expired))
        .values_list("used", "reserved", "expired")
        .first()
    )
    if row is None:  # no row: the request alone is over the limit (nothing can be reserved or expired)
        return 0, 0, False
    return int(row[0]), int(row[1]), bool(row[2])


def token_reserve_portable(reservation: Reservation, *, limit: int, now: datetime) -> Reservation:
    """`token_reserve` for databases without data-modifying CTEs (SQLite in the embedded default):
    the same guard as separate statements in one transaction."""
    user_id, day, tokens = reservation.user_id, reservation.day, reservation.tokens
    refusal: ServiceError | None = None
    with transaction.atomic():
        _day_row_ensure(user_id=user_id, day=day)
        expired = TokenReservation.objects.filter(user_id=user_id, day=day, expires_at__lte=now)
        _reap_rows(list(expired.values_list("id", "user_id", "day", "tokens")))
        admitted = DailyTokenUsage.objects.filter(
            user_id=user_id, day=day, used__lte=limit - tokens - F("reserved")
        ).update(reserved=F("reserved") + tokens)
        if admitted:
            TokenReservation.objects.create(
                id=reservation.id,
                user_id=user_id,
                day=day,
                tokens=tokens,
                expires_at=now + timedelta(seconds=settings.TOKEN_RESERVATION_TTL_SECONDS),
            )
        else:
            used, reserved = _counts(user_id=user_id, day=day)
            refusal = _quota_exceeded(limit=limit, used=used, reserved=reserved, requested=tokens, now=now)
    # Raised outside the transaction, so the reaping above is kept.
    if refusal is not None:
        raise refusal
    return reservation


def token_settle(*, reservation: Reservation, actual_tokens: int) -> None:
    """Turn a reservation into `actual_tokens` used on its day; call inside the ledger's `transaction.atomic()`.

    If the reservation was already reaped (the request outlived its TTL), only `used` grows.
    """
    if not transaction.get_connection().in_atomic_block:
        raise TransactionManagementError("token_settle must run inside the caller's transaction.atomic()")
    if actual_tokens < 0:
        raise ValueError("actual_tokens must be >= 0")
    deleted, _ = TokenReservation.objects.filter(pk=reservation.id).delete()
    held = reservation.tokens if deleted else 0
    rows = DailyTokenUsage.objects.filter(user_id=reservation.user_id, day=reservation.day)
    if not rows.update(used=F("used") + actual_tokens, reserved=F("reserved") - held):
        # The day's row is gone (an operator deleted it): record the usage on a fresh one.
        _day_row_ensure(user_id=reservation.user_id, day=reservation.day)
        rows.update(used=F("used") + actual_tokens)


def token_release(*, reservation: Reservation) -> None:
    """Give a reservation's tokens back (the request failed before using any); a no-op if already gone."""
    with transaction.atomic():
        deleted, _ = TokenReservation.objects.filter(pk=reservation.id).delete()
        if deleted:
            DailyTokenUsage.objects.filter(user_id=reservation.user_id, day=reservation.day).update(
                reserved=F("reserved") - reservation.tokens
            )


def reservations_reap(*, now: datetime | None = None) -> int:
    """Return the tokens of every reservation expired at `now` and delete them; returns how many."""
    now = _utc(now)
    reaped = 0
    while True:
        batch = list(
            TokenReservation.objects.filter(expires_at__lte=now)
            .order_by("expires_at")
            .values_list("id", "user_id", "day", "tokens")[:_REAP_BATCH]
        )
        groups: defaultdict[tuple[int, date], list[tuple[uuid.UUID, int, date, int]]] = defaultdict(list)
        for row in batch:
            groups[(row[1], row[2])].append(row)
        # One short transaction per user and day: no lock is held across many users' rows.
        for key in sorted(groups):
            with transaction.atomic():
                reaped += _reap_rows(groups[key])
        if len(batch) < _REAP_BATCH:
            return reaped


def quota_state(*, user_id: int, limit: int, now: datetime | None = None) -> QuotaState:
    """The user's tokens for today (UTC): used, held by in-flight requests, and what is left."""
    now = _utc(now)
    used, reserved = _counts(user_id=user_id, day=now.date())
    return QuotaState(
        limit=limit,
        used=used,
        reserved=reserved,
        remaining=max(0, limit - used - reserved),
        reset_seconds=seconds_until_next_day(now),
    )
