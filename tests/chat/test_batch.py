"""`POST /chat/batch` over a real socket: items answered in order, each admitted, refused, limited
and billed on its own; the batch size limit; and the concurrency bound, seen at the sandbox."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.quota_rows import quota_rows_held
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)


def batch(url: str, key: str, items: object) -> httpx.Response:
    return httpx.post(
        f"{url}/chat/batch", json={"requests": items}, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def test_mixed_batch_answers_each_item_in_order_and_bills_each_alone(service_url, sandbox, make_user, settings) -> None:
    settings.ENABLE_FALLBACK = False
    settings.MAX_RETRY_ATTEMPTS = 1
    user, key = make_user("free")  # deepseek and gemini only
    items = [
        {"message": "first [[tokens:3]]", "model": "deepseek"},
        {"message": "not on my plan", "model": "gpt-4o"},
        {"message": 5},
        {"message": "boom [[fail:500]]", "model": "gemini"},
        {"message": "last [[tokens:2]]", "model": "gemini-2.5-flash"},
        "not an object",
        {"message": "hi", "stream": True},
        {"message": "hi", "surprise": 1},
    ]
    response = batch(service_url, key, items)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(range(len(items)))
    assert [r["status"] for r in results] == [200, 403, 400, 502, 200, 400, 400, 400]
    for r in results:
        assert (r["response"] is None) != (r["error"] is None)
    codes = [r["error"]["code"] if r["error"] else None for r in results]
    assert codes[1] == "model_not_allowed" and codes[2] == "invalid_request" and codes[7] == "invalid_request"
    assert results[3]["error"]["details"]["provider"] == "gemini"

    first, last = results[0]["response"], results[4]["response"]
    assert (first["provider"], first["output_tokens"]) == ("deepseek", 3)
    assert (last["model_used"], last["output_tokens"]) == ("gemini-2.5-flash", 2)
    assert first["request_id"] != last["request_id"]
    assert first["conversation_id"] != last["conversation_id"]

    # Billed one by one: a record per admitted item, none for the refused ones.
    records = {str(r.request_id): r for r in UsageRecord.objects.filter(user=user)}
    assert len(records) == 3
    assert records[first["request_id"]].output_tokens == 3 and records[first["request_id"]].transport == "batch"
    assert records[last["request_id"]].output_tokens == 2
    [failed] = [r for r in records.values() if r.status == "failed"]
    assert (failed.provider, failed.error_code, failed.cost) == ("gemini", codes[3], 0)
    assert len(sandbox.calls("deepseek")) == 1 and len(sandbox.calls("gemini")) == 2 and not sandbox.calls("openai")

    # The hourly limit counted the three admitted items and nothing else.
    usage = httpx.get(f"{service_url}/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["quota"]["requests_per_hour"]["used"] == 3 and usage["requests"] == 3


def test_each_item_meets_the_hourly_limit_on_its_own(service_url, sandbox, make_user) -> None:
    _, key = make_user("premium", requests_per_hour_override=2)
    response = batch(service_url, key, [{"message": f"item {n}", "model": "deepseek"} for n in range(3)])
    results = response.json()["results"]
    assert response.status_code == 200
    assert sorted(r["status"] for r in results) == [200, 200, 429]
    [limited] = [r for r in results if r["status"] == 429]
    assert limited["error"]["code"] == "rate_limit_exceeded" and limited["error"]["details"]["limit"] == 2
    assert UsageRecord.objects.count() == 2 and len(sandbox.calls("deepseek")) == 2


def test_batch_size_limit_and_shape_are_400(service_url, sandbox, make_user, settings) -> None:
    settings.BATCH_MAX_ITEMS = 3
    _, key = make_user("premium")
    too_many = batch(service_url, key, [{"message": "hi", "model": "deepseek"}] * 4)
    assert too_many.status_code == 400
    error = too_many.json()["error"]
    assert error["code"] == "invalid_request" and error["details"]["limit"] == 3
    assert "requests" in error["details"]["fields"]
    assert batch(service_url, key, [{"message": "hi", "model": "deepseek"}] * 3).status_code == 200
    bodies: list[dict[str, Any]] = [{"requests": []}, {"requests": "hi"}, {"items": []}, {"requests": [], "extra": 1}]
    for body in bodies:
        shaped = httpx.post(f"{service_url}/chat/batch", json=body, headers={"Authorization": f"Bearer {key}"})
        assert shaped.status_code == 400 and shaped.json()["error"]["code"] == "invalid_request"
    assert UsageRecord.objects.count() == 3 and len(sandbox.calls()) == 3
    assert httpx.post(f"{service_url}/chat/batch", json={"requests": [{"message": "hi"}]}).status_code == 401


def peak_streams_during(sandbox, action: Callable[[], httpx.Response]) -> tuple[int, httpx.Response]:
    """Run `action` while a thread samples the sandbox's open streams; return the peak and the result."""
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            peak = max(peak, sandbox.active_streams)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = action()
    finally:
        done.set()
        sampler.join(timeout=5)
    return peak, result


@pytest.mark.parametrize("concurrency", [1, 3])
def test_items_run_at_most_batch_concurrency_at_a_time(service_url, sandbox, make_user, settings, concurrency) -> None:
    settings.BATCH_CONCURRENCY = concurrency
    _, key = make_user("enterprise")
    items = [{"message": f"slow {n} [[slow:60]] [[tokens:4]]", "model": "openai"} for n in range(6)]
    peak, response = peak_streams_during(sandbox, lambda: batch(service_url, key, items))
    assert response.status_code == 200
    assert [r["status"] for r in response.json()["results"]] == [200] * 6
    assert peak == concurrency
    assert sandbox.completed_streams == 6 and sandbox.active_streams == 0


def test_a_client_gone_while_items_are_admitted_leaves_no_item_running(service_url, sandbox, make_user) -> None:
    """The client hangs up while its items wait in admission (another transaction holds the
    user's quota row, so their reservations wait in Postgres). Once admitted, each item is
    cancelled and billed as such: none runs to the end for nobody."""
    import json
    import socket
    from urllib.parse import urlsplit

    from usage.models import DailyTokenUsage

    user, key = make_user("premium")
    DailyTokenUsage.objects.create(user=user, day=datetime.now(UTC).date(), used=0, reserved=0)
    items = [{"message": f"item {i} [[tokens:20]] [[slow:50]]", "model": "deepseek"} for i in range(3)]
    body = json.dumps({"requests": items}).encode()
    address = urlsplit(service_url)
    head = (
        f"POST /chat/batch HTTP/1.1\r\nHost: {address.hostname}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with quota_rows_held(user.pk):
        with socket.create_connection((address.hostname, address.port), timeout=10) as raw:
            raw.sendall(head + body)
            time.sleep(0.5)  # the items are in admission, waiting for the row
        time.sleep(0.5)  # the server has seen the client go
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and UsageRecord.objects.count() < len(items):
        time.sleep(0.05)
    time.sleep(0.3)
    records = list(UsageRecord.objects.values_list("status", "output_tokens"))
    assert records and all(status == "cancelled" for status, _ in records), records
    assert DailyTokenUsage.objects.get(user=user).reserved == 0  # every reservation settled
