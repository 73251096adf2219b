"""Races: concurrent reservations against one daily quota, and two processes sharing the limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection, connections, transaction

from accounts.services import user_get_or_create
from chatservice.async_db import statements
from chatservice.errors import ServiceError
from tests.quota_rows import quota_rows_held
from usage.limiter import RequestLimiter
from usage.models import DailyTokenUsage, TokenReservation
from usage.quotas import Reservation, _reservations, token_areserve, token_reserve, token_settle

REPO = Path(__file__).resolve().parents[2]
RESERVATIONS = 100
# 100 reservations leave one barrier from 25 threads, 4 each: every thread holds its own connection, and
# the Postgres these tests share allows 100 connections in all (other test runs use it at the same time).
WORKERS = 25
PER_WORKER = RESERVATIONS // WORKERS
ROUNDS = 20
BARRIER_TIMEOUT = 60


@dataclass
class Round:
    day: datetime
    tokens: int
    fits: int  # how many reservations the quota holds
    admitted: list[list[Reservation]] = field(default_factory=lambda: [[] for _ in range(WORKERS)])
    refused: list[int] = field(default_factory=lambda: [0] * WORKERS)
    actual: list[int] = field(default_factory=lambda: [0] * WORKERS)

    @property
    def limit(self) -> int:
        return self.tokens * self.fits + self.tokens - 1  # room for `fits`, never one more


def _rounds() -> list[Round]:
    fits = [0, 1, 50, 99, 100, 37, 12, 63, 88, 5, 71, 24, 96, 3, 45, 58, 80, 19, 67, 31]
    base = datetime(2032, 1, 1, 9, tzinfo=UTC)
    return [Round(day=base + timedelta(days=i), tokens=10 + 3 * i, fits=n) for i, n in enumerate(fits[:ROUNDS])]


@pytest.mark.django_db(transaction=True)
def test_concurrent_reservations_never_overrun_the_quota() -> None:
    user, _ = user_get_or_create(username="racer")
    rounds = _rounds()
    start = threading.Barrier(WORKERS + 1)
    reserved = threading.Barrier(WORKERS + 1)
    checked = threading.Barrier(WORKERS + 1)  # the main thread has looked at the reserved state
    settled = threading.Barrier(WORKERS + 1)
    barriers = (start, reserved, checked, settled)
    errors: list[BaseException] = []
    sampling = threading.Event()
    overruns: list[tuple[object, int]] = []
    samples = [0]
    limits = {r.day.date(): r.limit for r in rounds}

    def worker(index: int) -> None:
        try:
            connection.ensure_connection()
            for number, round_ in enumerate(rounds):
                start.wait(BARRIER_TIMEOUT)
                for _ in range(PER_WORKER):
                    try:
                        got = token_reserve(user_id=user.pk, limit=round_.limit, tokens=round_.tokens, now=round_.day)
                        round_.admitted[index].append(got)
                    except ServiceError as exc:
                        assert exc.code == "token_quota_exceeded"
                        round_.refused[index] += 1
                reserved.wait(BARRIER_TIMEOUT)
                checked.wait(BARRIER_TIMEOUT)
                with transaction.atomic():
                    for k, reservation in enumerate(round_.admitted[index]):
                        actual = (number * 7 + index * 3 + k) % (round_.tokens + 1)  # up to the estimate
                        token_settle(reservation=reservation, actual_tokens=actual)
                        round_.actual[index] += actual
                settled.wait(BARRIER_TIMEOUT)
        except BaseException as exc:
            errors.append(exc)
            for barrier in barriers:
                barrier.abort()
        finally:
            connections.close_all()

    def sampler() -> None:
        # Committed state, read while reservations and settlements race: never above the quota.
        try:
            while not sampling.is_set():
                rows = DailyTokenUsage.objects.filter(user_id=user.pk).values_list("day", "used", "reserved")
                for day, used, held in rows:
                    if used + held > limits[day]:
                        overruns.append((day, used + held))
                samples[0] += 1
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    watcher = threading.Thread(target=sampler)
    watcher.start()
    for thread in threads:
        thread.start()
    try:
        for round_ in rounds:
            start.wait(BARRIER_TIMEOUT)
            reserved.wait(BARRIER_TIMEOUT)
            admitted = sum(len(batch) for batch in round_.admitted)
            assert admitted == round_.fits
            assert sum(round_.refused) == RESERVATIONS - round_.fits
            assert _counts(user.pk, round_.day) == (0, round_.tokens * round_.fits)
            checked.wait(BARRIER_TIMEOUT)
            settled.wait(BARRIER_TIMEOUT)
            assert _counts(user.pk, round_.day) == (sum(round_.actual), 0)
            assert not TokenReservation.objects.filter(user_id=user.pk, day=round_.day.date()).exists()
    except threading.BrokenBarrierError:
        pass  # a worker failed: its error is reported below
    except BaseException:
        for barrier in barriers:
            barrier.abort()
        raise
    finally:
        for thread in threads:
            thread.join(BARRIER_TIMEOUT)
        sampling.set()
        watcher.join(BARRIER_TIMEOUT)
    assert not errors, errors
    assert not overruns, overruns
    assert samples[0] > 0


_SCRIPT = """
import asyncio, json, os, sys, time
import django
django.setup()
from accounts.principal import Principal
from chatservice.errors import ServiceError
from usage.admission import admit
from usage.limiter import RequestLimiter

async def main(config):
    limiter = RequestLimiter(redis_url=os.environ["REDIS_URL"], key_prefix=config["prefix"])
    deadline = time.monotonic() + 60
    while not os.path.exists(config["go"]):
        if time.monotonic() > deadline:
            sys.exit("never told to go")
        await asyncio.sleep(0.005)

    async def attempts(user):
        principal = Principal(
            user_id=user["id"], username="p", is_staff=False, plan="premium", priority=1,
            allowed_providers=frozenset(), requests_per_hour=user["rph"], tokens_per_day=user["tpd"],
            api_key_id=None,
        )
        admitted, refused = 0, []
        for _ in range(user["attempts"]):
            try:
                await admit(principal=principal, estimated_tokens=user["tokens"], limiter=limiter)
                admitted += 1
            except ServiceError as exc:
                refused.append(exc.code)
        return {"admitted": admitted, "refused": refused}

    results = await asyncio.gather(*(attempts(user) for user in config["users"]))
    await limiter.aclose()
    print(json.dumps(dict(zip([u["name"] for u in config["users"]], results))))

asyncio.run(main(json.loads(sys.argv[1])))
"""


@pytest.mark.django_db(transaction=True)
async def test_concurrent_reservations_on_the_event_loop_never_overrun_the_quota(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request path's reservations (sent in batches from the event loop, their commits not
    waiting for the disk) keep the same guard: of 200 at once exactly those that fit are
    admitted, and the day's row holds exactly their tokens, as every other connection sees it."""
    user, _ = await asyncio.to_thread(user_get_or_create, username="loop-racer")
    fits, tokens = 73, 11
    batches: list[tuple[int, bool]] = []
    fetchone_each = statements.fetchone_each

    async def spy(sql: str, params: list, *, synchronous_commit: bool = True) -> list:
        batches.append((len(params), synchronous_commit))
        return await fetchone_each(sql, params, synchronous_commit=synchronous_commit)

    monkeypatch.setattr(statements, "fetchone_each", spy)

    async def reserve() -> Reservation | None:
        try:
            return await token_areserve(user_id=user.pk, limit=tokens * fits + tokens - 1, tokens=tokens)
        except ServiceError as exc:
            assert exc.code == "token_quota_exceeded"
            return None

    results = await asyncio.gather(*(reserve() for _ in range(200)))
    admitted = [r for r in results if r is not None]
    assert len(admitted) == fits
    assert sum(size for size, _ in batches) == 200 and len(batches) < 200  # together, in batches
    assert not any(synchronous for _, synchronous in batches)

    def stored() -> tuple[int, int]:
        row = DailyTokenUsage.objects.get(user_id=user.pk, day=admitted[0].day)
        return row.reserved, TokenReservation.objects.filter(user_id=user.pk).count()

    assert await asyncio.to_thread(stored) == (fits * tokens, fits)


@pytest.mark.django_db(transaction=True)
def test_two_processes_share_the_hourly_limit_and_the_daily_quota(tmp_path: Path) -> None:
    hourly, _ = user_get_or_create(username="hourly-bound")
    daily, _ = user_get_or_create(username="quota-bound")
    prefix = f"test-{uuid.uuid4().hex}"
    go = tmp_path / "go"
    users = [
        # 30 attempts, 10 per hour: the hourly window binds.
        {"name": "hourly", "id": hourly.pk, "rph": 10, "tpd": 1_000_000, "tokens": 5, "attempts": 15},
        # 20 attempts, a quota that holds 7 of them: the daily quota binds (and is not counted hourly).
        {"name": "daily", "id": daily.pk, "rph": 1000, "tpd": 750, "tokens": 100, "attempts": 10},
    ]
    script = tmp_path / "admit_many.py"
    script.write_text(_SCRIPT)
    db = settings.DATABASES["default"]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
    }
    config = json.dumps({"prefix": prefix, "go": str(go), "users": users})
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), config], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    time.sleep(0.5)  # let both import Django before the start signal (not needed for correctness)
    go.touch()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err.decode()
        outputs.append(json.loads(out.decode().strip().splitlines()[-1]))

    hourly_admitted = sum(o["hourly"]["admitted"] for o in outputs)
    assert hourly_admitted == 10
    assert all(code == "rate_limit_exceeded" for o in outputs for code in o["hourly"]["refused"])
    daily_admitted = sum(o["daily"]["admitted"] for o in outputs)
    assert daily_admitted == 7
    assert all(code == "token_quota_exceeded" for o in outputs for code in o["daily"]["refused"])

    # The ledger agrees: refused hourly requests gave their tokens back; quota refusals were not counted.
    assert DailyTokenUsage.objects.get(user_id=hourly.pk).reserved == 10 * 5
    assert DailyTokenUsage.objects.get(user_id=daily.pk).reserved == 7 * 100
    assert TokenReservation.objects.filter(user_id=hourly.pk).count() == 10

    async def peek() -> tuple[int, int]:
        limiter = RequestLimiter(redis_url=settings.REDIS_URL, key_prefix=prefix)
        try:
            return (
                (await limiter.peek(user_id=hourly.pk, limit=10)).used,
                (await limiter.peek(user_id=daily.pk, limit=1000)).used,
            )
        finally:
            await limiter.aclose()

    assert asyncio.run(peek()) == (10, 7)


def _counts(user_id: int, day: datetime) -> tuple[int, int]:
    """(used, reserved) of the user's day; a day no reservation ever fitted has no row: (0, 0)."""
    row = DailyTokenUsage.objects.filter(user_id=user_id, day=day.date()).first()
    return (row.used, row.reserved) if row else (0, 0)


@pytest.mark.django_db(transaction=True)
async def test_a_reservation_whose_request_left_while_it_was_on_its_way_is_given_back() -> None:
    """The day row is held by another transaction, so the reservation waits in Postgres; the
    request is cancelled meanwhile. When the reservation goes through, its tokens come back."""
    user, _ = await asyncio.to_thread(user_get_or_create, username="quitter")
    await token_areserve(user_id=user.pk, limit=1000, tokens=10)  # the day's row exists
    with quota_rows_held(user.pk):
        request = asyncio.create_task(token_areserve(user_id=user.pk, limit=1000, tokens=25))
        await asyncio.sleep(0.2)  # sent, and waiting for the row
        request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request
    await _reservations.drained()
    assert request.cancelled()

    def stored() -> tuple[int, int]:
        row = DailyTokenUsage.objects.get(user_id=user.pk)
        return row.reserved, TokenReservation.objects.filter(user_id=user.pk).count()

    assert await asyncio.to_thread(stored) == (10, 1)  # only the first reservation is held
