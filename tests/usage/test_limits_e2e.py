"""The plans' limits through the real service: exact under concurrency, across two processes, on every transport.

Requests go over real sockets to the service (in-process `service_url`, or uvicorn subprocesses
sharing the test's Postgres and Redis); the providers are the sandbox upstream. A reply's usage
equals its reservation (see `balanced_message`), so "exactly N admitted" does not depend on timing.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db import connections
from django.db.models import F, Sum

from providers.base import ChatMessage
from providers.sandbox.faults import SandboxState, count_prompt_tokens
from providers.tokens import count_messages
from tests.chat.clients import sse_chat, ws_chat
from tests.sandbox_server import BackgroundServer
from tests.usage.servers import RedisProcess, ServerProcess, running_services, start_redis
from usage.limiter import WINDOW_SECONDS, request_limiter
from usage.models import DailyTokenUsage, TokenReservation, UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "openai"  # served by gpt-4o-mini, whose prompt count is exact (tiktoken)
UPSTREAM_MODEL = "gpt-4o-mini"
MAX_TOKENS = 1
BURST = 100
# How many requests of each round's burst the quota holds (20 rounds); the slack under one more varies too.
ROUND_FITS = (0, 1, 3, 17, 8, 25, 2, 11, 5, 20, 14, 7, 1, 22, 9, 4, 13, 6, 19, 10)
MAX_SAMPLES = 200_000
HTTP_TIMEOUT = 60.0

Post = Callable[..., httpx.Response]


def balanced_message() -> tuple[str, int]:
    """A message the service and the sandbox count as the same number of prompt tokens, and that count.

    The service reserves its own count plus max_tokens; the sandbox bills its own count plus the
    reply. With `[[tokens:1]]` and max_tokens 1 the settled usage then equals the reservation, so
    no settlement frees tokens mid-burst and the number admitted is exact whatever the timing.
    """
    for length in range(8, 400):
        text = "a" * length + " [[tokens:1]]"
        tokens = count_messages((ChatMessage("user", text),), UPSTREAM_MODEL).tokens
        if tokens == count_prompt_tokens([text]):
            return text, tokens
    raise AssertionError("no message length where the service and the sandbox count the prompt alike")


MESSAGE, PROMPT_TOKENS = balanced_message()
ESTIMATE = PROMPT_TOKENS + MAX_TOKENS  # what admission reserves for one request
CHAT = {"message": MESSAGE, "model": MODEL, "max_tokens": MAX_TOKENS}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post_chat(url: str, key: str, body: Any = None, *, path: str = "/chat") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=CHAT if body is None else body, headers=bearer(key), timeout=HTTP_TIMEOUT)


def usage(url: str, key: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/usage", headers=bearer(key), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    quota: dict[str, Any] = response.json()["quota"]
    return quota


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


async def _burst(requests: list[tuple[str, str]], body: dict[str, Any]) -> list[httpx.Response]:
    """POST `body` to /chat once per (url, key), all released together; responses in request order."""
    go = asyncio.Event()
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, limits=limits) as client:

        async def one(url: str, key: str) -> httpx.Response:
            await go.wait()
            return await client.post(f"{url}/chat", json=body, headers=bearer(key))

        tasks = [asyncio.create_task(one(url, key)) for url, key in requests]
        await asyncio.sleep(0)  # every task is parked at the barrier
        go.set()
        return list(await asyncio.gather(*tasks))


def burst(
    requests: list[tuple[str, str]], body: dict[str, Any] = CHAT, *, server: BackgroundServer | None = None
) -> list[httpx.Response]:
    try:
        return asyncio.run(_burst(requests, body))
    except httpx.TimeoutException:
        if server is not None:  # a request stalled: show where the in-process server is waiting
            server.dump_stacks()
        raise


def seconds_to_utc_midnight(at: float) -> int:
    now = datetime.fromtimestamp(at, UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return math.ceil((midnight - now).total_seconds())


def ledger(user_id: int) -> tuple[int, int, int]:
    """(used, reserved) of the user's quota row today, and the sum of their UsageRecords' tokens."""
    row = DailyTokenUsage.objects.filter(user_id=user_id).values_list("used", "reserved").first() or (0, 0)
    billed = UsageRecord.objects.filter(user_id=user_id).aggregate(t=Sum(F("input_tokens") + F("output_tokens")))
    return int(row[0]), int(row[1]), int(billed["t"] or 0)


@dataclass
class QuotaSampler:
    """Reads every watched user's committed used+reserved in a loop on its own connection, noting overruns."""

    limits: dict[int, int] = field(default_factory=dict)
    overruns: list[tuple[int, int, int]] = field(default_factory=list)
    samples: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, user_id: int, limit: int) -> None:
        with self.lock:
            self.limits[user_id] = limit

    def run(self) -> None:
        try:
            for _ in range(MAX_SAMPLES):
                if self.stop.is_set():
                    return
                with self.lock:
                    limits = dict(self.limits)
                rows = DailyTokenUsage.objects.filter(user_id__in=list(limits)).values_list(
                    "user_id", "used", "reserved"
                )
                for user_id, used, reserved in rows.values_list("user_id", "used", "reserved"):
                    if used + reserved > limits[user_id]:
                        self.overruns.append((user_id, used + reserved, limits[user_id]))
                self.samples += 1
                time.sleep(0.005)
        finally:
            connections.close_all()


@pytest.fixture
def quota_sampler() -> Iterator[QuotaSampler]:
    sampler = QuotaSampler()
    thread = threading.Thread(target=sampler.run, name="quota-sampler")
    thread.start()
    yield sampler
    sampler.stop.set()
    thread.join(30)


@pytest.mark.timeout(300)  # 2,000 requests through the in-process server
def test_a_burst_of_100_admits_exactly_what_the_daily_quota_holds(
    service_url: str,
    service_server: BackgroundServer,
    sandbox: SandboxState,
    make_user: Callable[..., tuple[Any, str]],
    quota_sampler: QuotaSampler,
) -> None:
    admitted_total = 0
    for number, fits in enumerate(ROUND_FITS):
        limit = fits * ESTIMATE + (number * 7) % ESTIMATE  # room for `fits` requests, never one more
        user, key = make_user("premium", tokens_per_day_override=limit, requests_per_hour_override=1000)
        quota_sampler.watch(user.pk, limit)
        usage(service_url, key)  # the key is verified once and cached, as for any client that keeps calling
        before = time.time()
        responses = burst([(service_url, key)] * BURST, server=service_server)
        after = time.time()

        statuses = Counter(r.status_code for r in responses)
        assert statuses == Counter({200: fits, 429: BURST - fits} if fits else {429: BURST}), (number, statuses)
        for response in responses:
            if response.status_code == 200:
                body = response.json()
                assert (body["input_tokens"], body["output_tokens"]) == (PROMPT_TOKENS, MAX_TOKENS)
                assert response.headers["X-RateLimit-Limit"] == "1000"
                continue
            error = response.json()["error"]
            assert error["code"] == "token_quota_exceeded"
            assert error["details"]["requested"] == ESTIMATE and error["details"]["limit"] == limit
            # The headers describe the daily quota that refused, which resets at the next UTC midnight.
            retry_after = int(response.headers["Retry-After"])
            assert seconds_to_utc_midnight(after) <= retry_after <= seconds_to_utc_midnight(before)
            assert response.headers["X-RateLimit-Reset"] == str(retry_after)
            assert response.headers["X-RateLimit-Limit"] == str(limit)
            assert 0 <= int(response.headers["X-RateLimit-Remaining"]) < ESTIMATE

        used, reserved, billed = ledger(user.pk)
        assert (used, reserved, billed) == (fits * ESTIMATE, 0, fits * ESTIMATE), number
        assert UsageRecord.objects.filter(user=user).count() == fits
        assert not TokenReservation.objects.filter(user=user).exists()
        # Quota refusals were not counted toward the hourly limit.
        assert usage(service_url, key)["requests_per_hour"]["used"] == fits
        admitted_total += fits
        assert len(sandbox.calls()) == admitted_total

    quota_sampler.stop.set()
    assert quota_sampler.samples > 0
    assert quota_sampler.overruns == []


@dataclass
class FakeClock:
    now: float

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def window_clock() -> Iterator[FakeClock]:
    """The service's limiter reads this clock (its `clock` attribute), so the window's edges can be hit exactly."""
    limiter = request_limiter()
    original = limiter.clock
    clock = FakeClock(1_900_000_000.0)
    limiter.clock = clock
    yield clock
    limiter.clock = original


def rate_headers(response: httpx.Response) -> tuple[str, str, str]:
    h = response.headers
    return h["X-RateLimit-Limit"], h["X-RateLimit-Remaining"], h["X-RateLimit-Reset"]


def test_the_hourly_window_to_the_second(
    service_url: str, sandbox: SandboxState, make_user: Callable[..., tuple[Any, str]], window_clock: FakeClock
) -> None:
    _, key = make_user("premium", requests_per_hour_override=3)
    start = window_clock.now
    assert WINDOW_SECONDS == 3600

    # Remaining on a success already counts it; Reset is when the oldest counted request leaves.
    for offset, remaining, reset in [(0.0, "2", "3601"), (100.25, "1", "3500"), (200.5, "0", "3400")]:
        window_clock.now = start + offset
        response = post_chat(service_url, key)
        assert response.status_code == 200, response.text
        assert rate_headers(response) == ("3", remaining, reset)

    # Full: Retry-After is the whole seconds until the request at `start` leaves; the edge is inclusive.
    for offset, retry_after in [(1000.75, 2600), (1800.0, 1801), (3599.5, 1), (3600.0, 1)]:
        window_clock.now = start + offset
        response = post_chat(service_url, key)
        assert response.status_code == 429 and error_code(response) == "rate_limit_exceeded"
        assert response.headers["Retry-After"] == str(retry_after)
        assert rate_headers(response) == ("3", "0", str(retry_after))
        details = response.json()["error"]["details"]
        assert details == {"limit": 3, "used": 3, "remaining": 0, "reset_seconds": retry_after}
    assert usage(service_url, key)["requests_per_hour"] == {"limit": 3, "used": 3, "remaining": 0, "reset_seconds": 1}

    # Just past the edge the first request has left; the four refusals were never counted, so one fits.
    window_clock.now = start + 3600.5
    response = post_chat(service_url, key)
    assert response.status_code == 200, response.text
    assert rate_headers(response) == ("3", "0", "100")  # the next to leave is the one at +100.25
    window_clock.now = start + 3700.25
    response = post_chat(service_url, key)
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    window_clock.now = start + 3700.5
    assert post_chat(service_url, key).status_code == 200
    assert len(sandbox.calls()) == 5 and UsageRecord.objects.count() == 5


def test_refused_requests_do_not_count_toward_the_hourly_limit(
    service_url: str, sandbox: SandboxState, make_user: Callable[..., tuple[Any, str]], settings: Any
) -> None:
    from accounts.services import api_key_create, api_key_revoke

    quota = 10 * ESTIMATE
    user, key = make_user("free", requests_per_hour_override=5, tokens_per_day_override=quota)
    revoked = api_key_create(user=user)
    api_key_revoke(api_key=revoked.api_key)
    cheap = {**CHAT, "model": "deepseek"}
    assert usage(service_url, key)["requests_per_hour"]["used"] == 0

    first = post_chat(service_url, key, cheap)
    assert first.status_code == 200, first.text
    assert rate_headers(first)[:2] == ("5", "4")

    refusals: list[tuple[Any, str | None, int, str]] = [
        ({**cheap, "max_tokens": quota}, key, 429, "token_quota_exceeded"),
        ({"message": ""}, key, 400, "invalid_request"),
        ({**cheap, "surprise": 1}, key, 400, "invalid_request"),
        ({**cheap, "max_tokens": 10**7}, key, 400, "invalid_request"),
        ({**cheap, "model": "gpt-99"}, key, 400, "unknown_model"),
        ({**cheap, "model": "openai"}, key, 403, "model_not_allowed"),
        (cheap, revoked.raw_key, 401, "unauthenticated"),
        (cheap, "cs_nope_wrongwrongwrong", 401, "unauthenticated"),
        (cheap, None, 401, "unauthenticated"),
    ]
    for body, with_key, status, code in refusals:
        headers = bearer(with_key) if with_key else {}
        response = httpx.post(f"{service_url}/chat", json=body, headers=headers, timeout=HTTP_TIMEOUT)
        assert (response.status_code, error_code(response)) == (status, code), (body, response.text)
        if code == "token_quota_exceeded":
            # The headers describe the limit that refused: the daily tokens, not the hourly requests.
            assert response.headers["X-RateLimit-Limit"] == str(quota)
            assert int(response.headers["X-RateLimit-Remaining"]) == quota - ledger(user.pk)[0]
    bad_json = httpx.post(f"{service_url}/chat", content=b"{not json", headers=bearer(key), timeout=HTTP_TIMEOUT)
    assert (bad_json.status_code, error_code(bad_json)) == (400, "invalid_json")

    hourly = usage(service_url, key)["requests_per_hour"]
    assert (hourly["used"], hourly["remaining"]) == (1, 4)
    second = post_chat(service_url, key, cheap)
    assert second.status_code == 200 and rate_headers(second)[:2] == ("5", "3")
    # An admitted request counts even when the provider then fails.
    settings.ENABLE_FALLBACK = False
    settings.MAX_RETRY_ATTEMPTS = 1
    failed = post_chat(service_url, key, {**cheap, "message": MESSAGE + " [[fail:500]]"})
    assert failed.status_code == 502 and rate_headers(failed)[:2] == ("5", "2")
    assert usage(service_url, key)["requests_per_hour"]["used"] == 3
    assert len(sandbox.calls()) == 3
    used, reserved, billed = ledger(user.pk)
    assert (used, reserved) == (billed, 0) and billed > 0


def _batch(url: str, key: str, items: int) -> httpx.Response:
    body = {"requests": [CHAT] * items}
    return httpx.post(f"{url}/chat/batch", json=body, headers=bearer(key), timeout=HTTP_TIMEOUT)


def _openai(url: str, key: str) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": MAX_TOKENS}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key), timeout=HTTP_TIMEOUT)


def test_every_transport_counts_in_one_window_and_is_refused_by_it(
    service_url: str, sandbox: SandboxState, make_user: Callable[..., tuple[Any, str]]
) -> None:
    user, key = make_user("premium", requests_per_hour_override=5)

    # One admitted request per transport: each counts in the same hourly window.
    rest = post_chat(service_url, key)
    assert rest.status_code == 200 and rate_headers(rest)[:2] == ("5", "4")
    sse = sse_chat(service_url, key, CHAT)
    assert sse.status == 200 and sse.names()[-1] == "done"
    assert sse.headers["x-ratelimit-remaining"] == "3"
    ws = asyncio.run(ws_chat(service_url, key, CHAT))
    assert ws.names()[-1] == "done"
    batch = _batch(service_url, key, 1)
    assert batch.status_code == 200 and batch.json()["results"][0]["status"] == 200
    v1 = _openai(service_url, key)
    assert v1.status_code == 200 and rate_headers(v1)[:2] == ("5", "0")
    assert usage(service_url, key)["requests_per_hour"]["used"] == 5

    # At the limit, every transport is refused by the same check, before anything goes upstream.
    rest = post_chat(service_url, key)
    assert rest.status_code == 429 and error_code(rest) == "rate_limit_exceeded"
    assert rate_headers(rest)[:2] == ("5", "0") and int(rest.headers["Retry-After"]) >= 1

    sse = sse_chat(service_url, key, CHAT)
    assert sse.status == 429 and sse.headers["content-type"].startswith("application/json")
    assert sse.names() == ["http_error"]  # a JSON body, no event
    assert sse.last()["error"]["code"] == "rate_limit_exceeded"
    assert int(sse.headers["retry-after"]) >= 1 and sse.headers["x-ratelimit-limit"] == "5"

    ws = asyncio.run(ws_chat(service_url, key, CHAT))
    assert ws.names() == ["error"] and ws.last()["error"]["code"] == "rate_limit_exceeded"
    assert ws.last()["request_id"] == "client-1"

    batch = _batch(service_url, key, 2)
    assert batch.status_code == 200
    results = batch.json()["results"]
    assert [(r["index"], r["status"], r["response"]) for r in results] == [(0, 429, None), (1, 429, None)]
    assert {r["error"]["code"] for r in results} == {"rate_limit_exceeded"}

    v1 = _openai(service_url, key)
    assert v1.status_code == 429 and int(v1.headers["Retry-After"]) >= 1
    error = v1.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert v1.headers["X-RateLimit-Limit"] == "5"

    assert len(sandbox.calls()) == 5
    transports = Counter(UsageRecord.objects.filter(user=user).values_list("transport", flat=True))
    assert transports == Counter({"rest": 1, "sse": 1, "websocket": 1, "batch": 1, "openai": 1})
    assert usage(service_url, key)["requests_per_hour"]["used"] == 5
    used, reserved, billed = ledger(user.pk)
    assert (used, reserved, billed) == (5 * ESTIMATE, 0, 5 * ESTIMATE)


@pytest.fixture
def two_services(
    sandbox_server: BackgroundServer, sandbox: SandboxState, transactional_db: None, tmp_path: Path
) -> Iterator[list[ServerProcess]]:
    """Two uvicorn processes of the service on the test database, the test's Redis and namespaces, the sandbox."""
    with running_services(2, sandbox_url=sandbox_server.url, log_dir=tmp_path) as servers:
        yield servers


def test_two_processes_share_the_hourly_limit_and_the_daily_quota(
    two_services: list[ServerProcess],
    sandbox: SandboxState,
    make_user: Callable[..., tuple[Any, str]],
    quota_sampler: QuotaSampler,
) -> None:
    first, second = (server.url for server in two_services)
    hourly_user, hourly_key = make_user("premium", requests_per_hour_override=10)
    quota_limit = 7 * ESTIMATE + ESTIMATE - 1
    quota_user, quota_key = make_user("premium", tokens_per_day_override=quota_limit)
    quota_sampler.watch(quota_user.pk, quota_limit)

    # 30 requests against 10 per hour and 20 against a quota that holds 7, alternating between the processes.
    hourly = [(url, hourly_key) for url in (first, second) * 15]
    daily = [(url, quota_key) for url in (first, second) * 10]
    responses = burst(hourly + daily)
    hourly_responses, daily_responses = responses[:30], responses[30:]

    assert Counter(r.status_code for r in hourly_responses) == Counter({200: 10, 429: 20})
    assert {error_code(r) for r in hourly_responses if r.status_code == 429} == {"rate_limit_exceeded"}
    assert {r.headers["X-RateLimit-Limit"] for r in hourly_responses} == {"10"}
    assert Counter(r.status_code for r in daily_responses) == Counter({200: 7, 429: 13})
    assert {error_code(r) for r in daily_responses if r.status_code == 429} == {"token_quota_exceeded"}

    for url in (first, second):  # both processes see the same shared state
        hourly_quota = usage(url, hourly_key)
        assert hourly_quota["requests_per_hour"]["used"] == 10
        daily_quota = usage(url, quota_key)
        assert daily_quota["requests_per_hour"]["used"] == 7  # quota refusals were not counted
        tokens = daily_quota["tokens_per_day"]
        assert (tokens["limit"], tokens["used"], tokens["reserved"]) == (quota_limit, 7 * ESTIMATE, 0)
    assert ledger(quota_user.pk) == (7 * ESTIMATE, 0, 7 * ESTIMATE)
    assert ledger(hourly_user.pk) == (10 * ESTIMATE, 0, 10 * ESTIMATE)
    assert len(sandbox.calls()) == 17
    quota_sampler.stop.set()
    assert quota_sampler.samples > 0 and quota_sampler.overruns == []


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server this test may kill."""
    server = start_redis(log_dir=tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def service_on_own_redis(
    own_redis: RedisProcess,
    sandbox_server: BackgroundServer,
    sandbox: SandboxState,
    transactional_db: None,
    tmp_path: Path,
) -> Iterator[ServerProcess]:
    """One service process whose REDIS_URL is `own_redis` (so its outage leaves this test process untouched)."""
    with running_services(1, sandbox_url=sandbox_server.url, log_dir=tmp_path, redis_url=own_redis.url) as servers:
        yield servers[0]


def logged_warnings(server: ServerProcess) -> list[dict[str, Any]]:
    """The WARNING lines of the service's JSON log."""
    lines = [line for line in server.log_tail(1_000_000).splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    return [r for r in records if r.get("level") == "WARNING"]


def test_a_redis_outage_falls_back_to_the_per_process_limit(
    service_on_own_redis: ServerProcess,
    own_redis: RedisProcess,
    sandbox: SandboxState,
    make_user: Callable[..., tuple[Any, str]],
    settings: Any,
) -> None:
    import redis

    url = service_on_own_redis.url
    hourly_user, hourly_key = make_user("premium", requests_per_hour_override=4)
    quota_limit = 3 * ESTIMATE + ESTIMATE - 1
    quota_user, quota_key = make_user("premium", tokens_per_day_override=quota_limit)

    for remaining in ("3", "2"):
        response = post_chat(url, hourly_key)
        assert response.status_code == 200 and rate_headers(response)[:2] == ("4", remaining)
    probe = redis.Redis.from_url(own_redis.url)
    try:
        assert list(probe.scan_iter(f"{settings.RATE_LIMIT_NAMESPACE}:rph*"))  # the window is in this Redis
    finally:
        probe.close()

    own_redis.kill()
    # The process starts its own window: four more fit, then the per-process limit refuses.
    statuses = []
    for _ in range(6):
        response = post_chat(url, hourly_key)
        statuses.append((response.status_code, response.headers.get("X-RateLimit-Remaining")))
        if response.status_code == 429:
            assert error_code(response) == "rate_limit_exceeded" and int(response.headers["Retry-After"]) >= 1
    assert statuses == [(200, "3"), (200, "2"), (200, "1"), (200, "0"), (429, "0"), (429, "0")]
    assert usage(url, hourly_key)["requests_per_hour"]["used"] == 4

    # Token quotas live in Postgres: still exact under a burst during the outage.
    responses = burst([(url, quota_key)] * 5)
    assert Counter(r.status_code for r in responses) == Counter({200: 3, 429: 2})
    assert {error_code(r) for r in responses if r.status_code == 429} == {"token_quota_exceeded"}
    assert ledger(quota_user.pk) == (3 * ESTIMATE, 0, 3 * ESTIMATE)
    assert ledger(hourly_user.pk) == (6 * ESTIMATE, 0, 6 * ESTIMATE)
    assert len(sandbox.calls()) == 9

    # The outage is logged once by the limiter (not once per request: 14 requests ran without Redis), and
    # at most once by each holder of the router's shared state (the circuit and the status store).
    warnings = Counter(w["logger"] for w in logged_warnings(service_on_own_redis))
    assert warnings["usage.limiter"] == 1, warnings
    assert warnings["providers.circuit"] <= 2, warnings
    assert set(warnings) <= {"usage.limiter", "providers.circuit"}, warnings
