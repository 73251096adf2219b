"""The one admission function: token reservation first, then the hourly limit; refusals, headers, outages."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connections

from accounts.principal import Principal
from accounts.services import user_get_or_create
from chatservice.errors import ServiceError
from tests.redis_proxy import RedisProxy
from usage.admission import admit, rate_limit_headers
from usage.limiter import LimitState, RequestLimiter
from usage.models import DailyTokenUsage, TokenReservation
from usage.quotas import token_release

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
async def limiter(prefix: str) -> AsyncIterator[RequestLimiter]:
    made = RequestLimiter(redis_url=settings.REDIS_URL, key_prefix=prefix)
    yield made
    await made.aclose()


@pytest.fixture
def principal() -> Callable[..., Principal]:
    user, _ = user_get_or_create(username="admitted", plan_name="premium")

    def make(*, requests_per_hour: int = 5, tokens_per_day: int = 1000) -> Principal:
        return Principal(
            user_id=user.pk,
            username=user.username,
            is_staff=False,
            plan="premium",
            priority=1,
            allowed_providers=frozenset({"openai"}),
            requests_per_hour=requests_per_hour,
            tokens_per_day=tokens_per_day,
            api_key_id=None,
        )

    return make


@database_sync_to_async
def _reserved(user_id: int) -> tuple[int, int]:
    row = DailyTokenUsage.objects.filter(user_id=user_id).values_list("reserved", flat=True).first() or 0
    return row, TokenReservation.objects.filter(user_id=user_id).count()


async def _nothing_held_or_counted(caller: Principal, limiter: RequestLimiter) -> None:
    """Wait (bounded) until the caller holds no tokens and has no request counted this hour."""
    for _ in range(100):
        held, counted = await _reserved(caller.user_id), await limiter.peek(user_id=caller.user_id, limit=5)
        if held == (0, 0) and counted.used == 0:
            return
        await asyncio.sleep(0.01)
    assert (held, counted.used) == ((0, 0), 0)


async def test_admitted_request_holds_tokens_and_counts_once(
    principal: Callable[..., Principal], limiter: RequestLimiter
) -> None:
    caller = principal(requests_per_hour=5)
    admission = await admit(principal=caller, estimated_tokens=120, limiter=limiter)
    assert (admission.reservation.user_id, admission.reservation.tokens) == (caller.user_id, 120)
    assert (admission.limit.allowed, admission.limit.used, admission.limit.remaining) == (True, 1, 4)
    headers = rate_limit_headers(admission.limit)
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("5", "4")
    assert 3599 <= int(headers["X-RateLimit-Reset"]) <= 3601  # an hour from the real clock's "now"
    assert await _reserved(caller.user_id) == (120, 1)


async def test_token_quota_refusal_is_not_counted_hourly(
    principal: Callable[..., Principal], limiter: RequestLimiter
) -> None:
    caller = principal(requests_per_hour=5, tokens_per_day=100)
    with pytest.raises(ServiceError) as refused:
        await admit(principal=caller, estimated_tokens=101, limiter=limiter)
    assert (refused.value.code, refused.value.status) == ("token_quota_exceeded", 429)
    assert {"Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(
        refused.value.headers
    )
    assert (await limiter.peek(user_id=caller.user_id, limit=5)).used == 0
    assert await _reserved(caller.user_id) == (0, 0)


async def test_hourly_refusal_releases_the_reservation(
    principal: Callable[..., Principal], limiter: RequestLimiter
) -> None:
    caller = principal(requests_per_hour=2)
    await admit(principal=caller, estimated_tokens=10, limiter=limiter)
    await admit(principal=caller, estimated_tokens=20, limiter=limiter)
    with pytest.raises(ServiceError) as refused:
        await admit(principal=caller, estimated_tokens=40, limiter=limiter)
    error = refused.value
    assert (error.code, error.status) == ("rate_limit_exceeded", 429)
    assert error.headers["X-RateLimit-Limit"] == "2"
    assert error.headers["X-RateLimit-Remaining"] == "0"
    assert error.headers["Retry-After"] == error.headers["X-RateLimit-Reset"]
    assert 3590 <= int(error.headers["Retry-After"]) <= 3601
    assert error.details["limit"] == 2
    assert await _reserved(caller.user_id) == (30, 2)  # the refused request's 40 came back
    assert (await limiter.peek(user_id=caller.user_id, limit=2)).used == 2


async def test_without_redis_a_token_quota_refusal_is_not_counted_hourly_either(
    principal: Callable[..., Principal], prefix: str
) -> None:
    limiter = RequestLimiter(redis_url="", key_prefix=prefix)  # the per-process window
    caller = principal(requests_per_hour=2, tokens_per_day=100)
    for _ in range(3):
        with pytest.raises(ServiceError) as refused:
            await admit(principal=caller, estimated_tokens=101, limiter=limiter)
        assert refused.value.code == "token_quota_exceeded"
    assert (await limiter.peek(user_id=caller.user_id, limit=2)).used == 0
    assert [(await admit(principal=caller, estimated_tokens=10, limiter=limiter)).limit.used for _ in range(2)] == [
        1,
        2,
    ]


async def test_an_admission_cancelled_on_its_way_leaves_nothing_held_or_counted(
    principal: Callable[..., Principal], limiter: RequestLimiter
) -> None:
    caller = principal(requests_per_hour=5)
    for turns in range(6):  # cancelled at each point of its way: before, during and after the two checks
        task = asyncio.ensure_future(admit(principal=caller, estimated_tokens=10, limiter=limiter))
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        try:
            admission = await task
        except asyncio.CancelledError:
            continue
        await database_sync_to_async(token_release)(reservation=admission.reservation)  # admitted before the cancel
        await limiter.unhit(user_id=caller.user_id, state=admission.limit)
    await _nothing_held_or_counted(caller, limiter)  # the undoing runs on in tasks of its own


async def test_an_admission_cancelled_after_its_hourly_hit_takes_the_hit_back(
    principal: Callable[..., Principal], limiter: RequestLimiter
) -> None:
    caller = principal(requests_per_hour=5)
    first = await admit(principal=caller, estimated_tokens=10, limiter=limiter)  # the day's quota row exists
    await database_sync_to_async(token_release)(reservation=first.reservation)
    await limiter.unhit(user_id=caller.user_id, state=first.limit)
    params = await database_sync_to_async(connections["default"].get_connection_params)()
    params = {k: v for k, v in params.items() if k not in ("cursor_factory", "context")}  # Django's sync ones
    async with await psycopg.AsyncConnection.connect(**params) as locker:
        # Another transaction holds the row, so the reservation waits while the hourly hit counts.
        await locker.execute("SELECT 1 FROM usage_dailytokenusage WHERE user_id = %s FOR UPDATE", [caller.user_id])
        task = asyncio.ensure_future(admit(principal=caller, estimated_tokens=10, limiter=limiter))
        for _ in range(200):
            if (await limiter.peek(user_id=caller.user_id, limit=5)).used:
                break
            await asyncio.sleep(0.01)
        assert (await limiter.peek(user_id=caller.user_id, limit=5)).used == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await locker.rollback()
    await _nothing_held_or_counted(
        caller, limiter
    )  # the reservation is released and the hit taken back in tasks of their own


def test_rate_limit_headers_describe_the_hourly_window() -> None:
    state = LimitState(limit=50, used=7, remaining=43, reset_seconds=1234, allowed=True)
    assert rate_limit_headers(state) == {
        "X-RateLimit-Limit": "50",
        "X-RateLimit-Remaining": "43",
        "X-RateLimit-Reset": "1234",
    }


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_database_unreachable_is_503_and_counts_nothing(
    principal: Callable[..., Principal], limiter: RequestLimiter
) -> None:
    caller = principal(requests_per_hour=5)
    db = connections["default"].settings_dict  # shared by every thread's connection
    port = db["PORT"]
    db["PORT"] = str(_closed_port())
    try:
        await database_sync_to_async(connections.close_all)()
        with pytest.raises(ServiceError) as refused:
            await admit(principal=caller, estimated_tokens=10, limiter=limiter)
    finally:
        db["PORT"] = port
        await database_sync_to_async(connections.close_all)()
    assert (refused.value.code, refused.value.status) == ("database_unavailable", 503)
    assert (await limiter.peek(user_id=caller.user_id, limit=5)).used == 0
    admitted = await admit(principal=caller, estimated_tokens=10, limiter=limiter)  # and back
    assert admitted.limit.used == 1


async def test_redis_outage_keeps_admitting_per_process_and_quotas_stay_exact(
    principal: Callable[..., Principal], prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="usage.limiter")
    proxy = RedisProxy()
    await proxy.start()
    limiter = RequestLimiter(redis_url=proxy.url, key_prefix=prefix, probe_interval=0)
    caller = principal(requests_per_hour=3, tokens_per_day=1000)
    admitted = [await admit(principal=caller, estimated_tokens=100, limiter=limiter) for _ in range(2)]

    await proxy.stop()
    codes = []
    for _ in range(5):
        try:
            admitted.append(await admit(principal=caller, estimated_tokens=100, limiter=limiter))
        except ServiceError as exc:
            codes.append(exc.code)
    # The process window starts empty: three more are admitted, then the per-process limit holds.
    assert len(admitted) == 5
    assert codes == ["rate_limit_exceeded", "rate_limit_exceeded"]
    assert await _reserved(caller.user_id) == (500, 5)
    with pytest.raises(ServiceError) as quota:
        await admit(principal=caller, estimated_tokens=501, limiter=limiter)
    assert quota.value.details == {"limit": 1000, "used": 0, "reserved": 500, "requested": 501}
    warnings = [r for r in caplog.records if r.name == "usage.limiter" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    await limiter.aclose()
