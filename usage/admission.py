"""The one admission check every transport runs before the upstream call: daily tokens and hourly requests, at once."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from django.conf import settings
from django.db import InterfaceError, OperationalError

from accounts.principal import Principal
from chatservice.db import db_async
from chatservice.errors import ServiceError
from usage.limiter import LimitState, RequestLimiter, limit_hit, request_limiter
from usage.metrics import observe_limit_refusal
from usage.quotas import Reservation, token_areserve, token_release

logger = logging.getLogger(__name__)
_DATABASE_DOWN = (OperationalError, InterfaceError)


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted request: the tokens held for it, and its hourly window (already counting it)."""

    reservation: Reservation
    limit: LimitState


def rate_limit_headers(limit: LimitState) -> dict[str, str]:
    """`X-RateLimit-*` for the hourly request limit, as successful responses carry them."""
    return {
        "X-RateLimit-Limit": str(limit.limit),
        "X-RateLimit-Remaining": str(limit.remaining),
        "X-RateLimit-Reset": str(limit.reset_seconds),
    }


def rate_limit_exceeded(limit: LimitState) -> ServiceError:
    """The 429 for a full hourly window; Retry-After is when the oldest counted request leaves it."""
    retry_after = max(1, limit.reset_seconds)
    return ServiceError(
        "rate_limit_exceeded",
        f"The limit of {limit.limit} requests per hour is reached; retry in {retry_after} seconds.",
        status=429,
        details={"limit": limit.limit, "used": limit.used, "remaining": limit.remaining, "reset_seconds": retry_after},
        headers={**rate_limit_headers(limit), "Retry-After": str(retry_after)},
    )


def database_unavailable() -> ServiceError:
    return ServiceError("database_unavailable", "The database is unavailable; retry shortly.", status=503)


async def admit(*, principal: Principal, estimated_tokens: int, limiter: RequestLimiter | None = None) -> Admission:
    """Reserve the request's estimated tokens and count it against the hourly limit, or raise a 429/503.

    The two checks run at once (the hourly hit's Redis round trip goes out alongside the
    reservation's statement) and each refusal undoes the other's work: a request refused by the
    token quota (or not reserved, the database down) is taken back out of the hourly window, one
    refused hourly gets its tokens back. The token quota's refusal is the one reported when both
    refuse. The caller owns the returned reservation: settle it with the UsageRecord, or release it.
    """
    limiter = limiter or request_limiter()
    hit = asyncio.ensure_future(limit_hit(principal, limiter=limiter))
    try:
        reservation = await token_areserve(
            user_id=principal.user_id, limit=principal.tokens_per_day, tokens=estimated_tokens
        )
    except BaseException as exc:
        await _take_back(hit, principal, limiter, cancelled=not isinstance(exc, Exception))
        if isinstance(exc, _DATABASE_DOWN):
            raise database_unavailable() from exc
        if isinstance(exc, ServiceError):
            _count_refusal(principal, "tokens_per_day")
        raise
    try:
        state = await hit
    except BaseException:
        await _release(reservation)
        raise
    if not state.allowed:
        await _release(reservation)
        _count_refusal(principal, "requests_per_hour")
        raise rate_limit_exceeded(state)
    return Admission(reservation=reservation, limit=state)


async def _take_back(
    hit: asyncio.Future[LimitState], principal: Principal, limiter: RequestLimiter, *, cancelled: bool
) -> None:
    """Undo the hourly hit of a request that was not reserved, before its refusal is answered. A
    cancelled admission does not wait for a hit still on its way: it is cancelled, and the limiter
    takes it back if it reached Redis (`_ClockedRedisStorage._forget_abandoned`)."""
    if cancelled and not hit.done():
        hit.cancel()
        return
    try:
        state = await hit
        await limiter.unhit(user_id=principal.user_id, state=state)
    except Exception:
        # The limiter answers a Redis failure from its per-process window; anything else leaves the
        # request counted, which only makes the hourly limit stricter.
        logger.warning("could not take back the hourly hit of a refused request", exc_info=True)


def _count_refusal(principal: Principal, limit: str) -> None:
    # Here rather than in each transport: every way in admits through this one function.
    if settings.ENABLE_METRICS:
        observe_limit_refusal(principal.plan, limit)


async def _release(reservation: Reservation) -> None:
    try:
        await db_async(token_release)(reservation=reservation)
    except _DATABASE_DOWN:
        # The reservation expires and is reaped: its tokens come back then.
        logger.warning("could not release token reservation %s; it will be reaped", reservation.id, exc_info=True)
