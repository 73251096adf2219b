"""`GET /usage` over a real socket against a ledger the test wrote: totals and breakdowns to the
cent, UTC period edges, the default and named periods, live quota state after real traffic,
staff access to other users (404 for everyone else), and bad parameters in the one error shape."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import httpx
import pytest

from usage.models import UsageRecord
from usage.selectors import Period, period_from_params, usage_summary

pytestmark = pytest.mark.django_db(transaction=True)

DAY = date(2026, 3, 14)


def at(day: date, hh: int = 12, mm: int = 0, ss: int = 0, us: int = 0) -> datetime:
    return datetime.combine(day, time(hh, mm, ss, us), tzinfo=UTC)


def record(user, created_at: datetime, *, provider="openai", model="gpt-4o-mini", inp=10, out=5, cost="0.000001"):
    return UsageRecord.objects.create(
        request_id=uuid.uuid4(),
        created_at=created_at,
        user=user,
        plan=user.plan.name,
        transport="rest",
        provider=provider,
        model=model,
        input_tokens=inp,
        output_tokens=out,
        cost=Decimal(cost),
        status="ok",
        usage_source="provider",
    )


def get_usage(url: str, key: str, **params: str) -> httpx.Response:
    return httpx.get(f"{url}/usage", params=params, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def totals(row: dict) -> tuple[int, int, int, str]:
    return row["requests"], row["input_tokens"], row["output_tokens"], row["cost"]


def test_totals_and_breakdowns_for_a_period_with_its_edges(service_url, make_user) -> None:
    user, key = make_user("premium")
    other, _ = make_user("premium")
    before = DAY - timedelta(days=1)
    record(user, at(before, 23, 59, 59, 999_999), inp=1000, cost="1")  # just before `from`: out
    record(user, at(DAY, 0, 0, 0), inp=1, out=2, cost="0.000123456789")  # first instant: in
    record(user, at(DAY, 9), provider="claude", model="claude-haiku-4-5", inp=20, out=30, cost="0.25")
    record(user, at(DAY, 23, 59, 59, 999_000), inp=3, out=4, cost="0.000000000011")  # 23:59:59.999: in
    record(user, at(DAY + timedelta(days=1), 0, 0, 0), provider="gemini", model="gemini-2.5-flash", inp=5, out=6)
    record(user, at(DAY + timedelta(days=2)), inp=7000, cost="3")  # after `to`: out
    record(other, at(DAY, 12), inp=99, out=99, cost="9")  # someone else: never counted

    one_day = get_usage(service_url, key, **{"from": DAY.isoformat(), "to": DAY.isoformat()})
    assert one_day.status_code == 200, one_day.text
    body = one_day.json()
    assert body["period"] == {"from": "2026-03-14T00:00:00Z", "to": "2026-03-15T00:00:00Z"}
    assert totals(body) == (3, 24, 36, "0.2501234568")
    assert [r["provider"] for r in body["by_provider"]] == ["claude", "openai"]
    assert totals(body["by_provider"][1]) == (2, 4, 6, "0.0001234568")
    assert body["by_model"] == [
        {"model": "claude-haiku-4-5", "requests": 1, "input_tokens": 20, "output_tokens": 30, "cost": "0.25"},
        {"model": "gpt-4o-mini", "requests": 2, "input_tokens": 4, "output_tokens": 6, "cost": "0.0001234568"},
    ]
    assert body["by_day"] == [
        {"day": "2026-03-14", "requests": 3, "input_tokens": 24, "output_tokens": 36, "cost": "0.2501234568"}
    ]

    two_days = get_usage(service_url, key, **{"from": DAY.isoformat(), "to": "2026-03-15"}).json()
    assert totals(two_days) == (4, 29, 42, "0.2501244568")
    assert [(d["day"], d["requests"]) for d in two_days["by_day"]] == [("2026-03-14", 3), ("2026-03-15", 1)]
    assert {r["provider"] for r in two_days["by_provider"]} == {"claude", "gemini", "openai"}

    # Date-times are instants and `to` is exclusive: the midnight record falls out.
    exact = get_usage(service_url, key, **{"from": "2026-03-14T09:00:00Z", "to": "2026-03-15T00:00:00Z"}).json()
    assert totals(exact) == (2, 23, 34, "0.250000000011")


def test_money_is_a_decimal_string_and_counts_are_integers(service_url, make_user) -> None:
    user, key = make_user("premium")
    record(user, at(DAY, 1), cost="0.000000000001")
    record(user, at(DAY, 2), cost="12.5")
    body = get_usage(service_url, key, **{"from": DAY.isoformat(), "to": DAY.isoformat()}).json()
    assert body["cost"] == "12.500000000001"  # exact: no float rounding, no exponent
    for row in [body, *body["by_provider"], *body["by_model"], *body["by_day"]]:
        assert isinstance(row["cost"], str)
        assert all(type(row[k]) is int for k in ("requests", "input_tokens", "output_tokens"))
    empty = get_usage(service_url, key, **{"from": "2020-01-01", "to": "2020-01-31"}).json()
    assert totals(empty) == (0, 0, 0, "0") and empty["by_day"] == [] and empty["by_model"] == []


def test_default_is_today_and_named_periods_end_today(service_url, make_user) -> None:
    user, key = make_user("premium")
    today = datetime.now(UTC).date()
    record(user, at(today, 0, 0, 0), out=1)
    record(user, at(today - timedelta(days=1), 23, 59, 59, 999_000), out=10)
    record(user, at(today - timedelta(days=6), 0, 0, 1), out=100)
    record(user, at(today - timedelta(days=7), 23, 0), out=1000)
    record(user, at(today - timedelta(days=29), 0, 0, 0), out=10_000)
    record(user, at(today - timedelta(days=30), 12), out=100_000)

    default = get_usage(service_url, key).json()
    assert default["period"]["from"] == f"{today.isoformat()}T00:00:00Z"
    assert default["output_tokens"] == 1
    assert get_usage(service_url, key, period="day").json()["output_tokens"] == 1
    assert get_usage(service_url, key, period="week").json()["output_tokens"] == 111
    month = get_usage(service_url, key, period="month").json()
    assert month["output_tokens"] == 11_111 and len(month["by_day"]) == 5


def test_quota_state_is_live_and_reads_are_not_counted(service_url, sandbox, make_user) -> None:
    _, key = make_user("premium", tokens_per_day_override=50_000)
    reply = httpx.post(
        f"{service_url}/chat",
        json={"message": "count me [[tokens:6]]", "model": "openai"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    ).json()
    get_usage(service_url, key)
    body = get_usage(service_url, key).json()
    assert totals(body)[:3] == (1, reply["input_tokens"], 6)
    assert Decimal(body["cost"]) == UsageRecord.objects.get().cost
    hourly = body["quota"]["requests_per_hour"]
    assert (hourly["limit"], hourly["used"], hourly["remaining"]) == (500, 1, 499)
    assert 0 < hourly["reset_seconds"] <= 3600
    daily = body["quota"]["tokens_per_day"]
    assert (daily["limit"], daily["used"], daily["reserved"]) == (50_000, reply["tokens_used"], 0)
    assert daily["remaining"] == 50_000 - reply["tokens_used"]
    assert 0 < daily["reset_seconds"] <= 86_400


def test_staff_may_read_any_user_and_others_get_404(service_url, make_user) -> None:
    alice, alice_key = make_user("premium", username="alice")
    _, bob_key = make_user("free", username="bob")
    _, staff_key = make_user("enterprise", username="operator", is_staff=True)
    record(alice, at(DAY, 5), out=42)
    window = {"from": DAY.isoformat(), "to": DAY.isoformat()}

    seen_by_staff = get_usage(service_url, staff_key, user="alice", **window)
    assert seen_by_staff.status_code == 200 and seen_by_staff.json()["output_tokens"] == 42
    assert seen_by_staff.json()["quota"]["tokens_per_day"]["limit"] == 100_000  # alice's plan, not staff's
    assert get_usage(service_url, alice_key, user="alice", **window).json()["output_tokens"] == 42

    for key, name in ((bob_key, "alice"), (bob_key, "nobody"), (staff_key, "nobody")):
        response = get_usage(service_url, key, user=name, **window)
        assert response.status_code == 404
        assert response.json() == {"error": {"code": "not_found", "message": "The user was not found.", "details": {}}}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"period": "year"}, "period"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-02-30"}, "from"),
        ({"to": "2026-13-01"}, "to"),
        ({"from": "2026-03-10", "to": "2026-03-09"}, "to"),
        ({"from": "2024-01-01", "to": "2026-01-01"}, "from"),
        ({"from": "2026-03-01", "period": "week"}, "period"),
        ({"to": "9999-12-31"}, "to"),  # its end, the next day's midnight, is past datetime's range
        ({"to": "9999-12-31T23:00:00-05:00"}, "to"),  # past the range in UTC
        ({"from": "0001-01-01T00:00:00+01:00"}, "from"),  # before the range in UTC
    ],
)
def test_bad_parameters_are_400_in_the_error_shape(service_url, make_user, params, field) -> None:
    _, key = make_user("premium")
    response = get_usage(service_url, key, **params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["message"]
    assert field in error["details"]["fields"]


def test_usage_needs_a_key_and_only_reads(service_url) -> None:
    response = httpx.get(f"{service_url}/usage")
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthenticated"
    assert response.headers["X-Request-ID"]
    wrong = httpx.get(f"{service_url}/usage", headers={"Authorization": "Bearer cs_nope_wrongwrongwrong"})
    assert wrong.status_code == 401
    posted = httpx.post(f"{service_url}/usage")
    assert posted.status_code == 405 and posted.json()["error"]["code"] == "method_not_allowed"


def test_summary_is_one_query_however_many_records(make_user, django_assert_num_queries) -> None:
    user, _ = make_user("premium")
    for n in range(30):
        record(user, at(DAY - timedelta(days=n % 3), n % 24), model=("gpt-4o-mini", "gpt-4o")[n % 2])
    period = period_from_params({"from": "2026-03-01", "to": "2026-03-31"})
    with django_assert_num_queries(1):
        summary = usage_summary(user_id=user.pk, period=period)
    assert summary["requests"] == 30 and len(summary["by_day"]) == 3 and len(summary["by_model"]) == 2
    assert summary["cost"] == "0.00003"


def test_period_rules() -> None:
    now = datetime(2026, 3, 14, 15, 30, tzinfo=UTC)
    assert period_from_params({}, now=now) == Period(at(DAY, 0), at(DAY + timedelta(days=1), 0))
    week = period_from_params({"period": "week"}, now=now)
    assert week.start == at(DAY - timedelta(days=6), 0) and week.end == at(DAY + timedelta(days=1), 0)
    offset = period_from_params({"from": "2026-03-14T02:00:00+02:00"}, now=now)
    assert offset.start == at(DAY, 0) and offset.end == at(DAY + timedelta(days=1), 0)
    # a date in ISO's basic form is the same whole day as the extended form (it was midnight, so
    # `to=20260314` left the day out)
    basic = period_from_params({"from": "20260314", "to": "20260314"}, now=now)
    assert basic == period_from_params({"from": "2026-03-14", "to": "2026-03-14"}, now=now)
    assert basic.end == at(DAY + timedelta(days=1), 0)
