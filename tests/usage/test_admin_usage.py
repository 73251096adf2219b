"""The operators' admin: the usage page renders SVG charts and the right numbers from a real ledger,
the ledger change list is read-only with filters and totals, and only staff get in."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.urls import reverse

from accounts.models import User
from usage.admin_views import compact, dollars, nice_ceiling
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db

TODAY = datetime.now(UTC).date()


def record(user: User, days_ago: int, *, provider: str, model: str, inp: int, out: int, cost: str, status="ok"):
    return UsageRecord.objects.create(
        request_id=uuid.uuid4(),
        created_at=datetime.combine(TODAY - timedelta(days=days_ago), time(10), tzinfo=UTC),
        user=user,
        plan=user.plan.name,
        transport="rest",
        provider=provider,
        model=model,
        input_tokens=inp,
        output_tokens=out,
        cost=Decimal(cost),
        status=status,
        usage_source="provider",
    )


@pytest.fixture
def ledger(make_user):
    alice, _ = make_user("premium", username="alice")
    bob, _ = make_user("free", username="bob")
    eve, _ = make_user("premium", username="eve")
    User.objects.filter(pk=eve.pk).update(username="eve<b>")  # a name that must be escaped
    eve.refresh_from_db()
    record(alice, 0, provider="openai", model="gpt-4o", inp=1000, out=500, cost="1.25")
    record(alice, 1, provider="claude", model="claude-sonnet-4", inp=2000, out=1000, cost="2.5")
    record(bob, 2, provider="deepseek", model="deepseek-chat", inp=300, out=200, cost="0.0002", status="failed")
    record(eve, 3, provider="gemini", model="gemini-2.5-flash", inp=100, out=100, cost="0.75")
    record(alice, 20, provider="openai", model="gpt-4o", inp=7, out=7, cost="10")  # in 30 days, not in 7
    record(bob, 200, provider="openai", model="gpt-4o", inp=9, out=9, cost="99")  # outside every period
    return {"alice": alice, "bob": bob, "eve": eve}


@pytest.fixture
def staff_client(ledger) -> Client:
    admin_user = User.objects.create_superuser("operator", "operator@example.com", "pw-operator-123")
    client = Client()
    client.force_login(admin_user)
    return client


def test_usage_page_draws_charts_with_the_ledgers_numbers(staff_client) -> None:
    response = staff_client.get(reverse("admin:usage_dashboard"), {"days": 7})
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('<svg class="usage-chart"') == 4
    for title in ("Requests per day", "Tokens per day", "Cost per day (USD)", "Top users by cost"):
        assert f'aria-label="{title}"' in html
    # Totals of the last 7 days: four records.
    assert re.search(r'id="total-requests">4<', html)
    assert re.search(r'id="total-tokens">5,200<', html)
    assert re.search(r'id="total-cost" title="\$4.5002">\$4.50<', html)
    # Every provider has a colored series; each day's bar has a tooltip with its value.
    for provider in ("openai", "claude", "deepseek", "gemini"):
        assert f">{provider}</text>" in html
    day = (TODAY - timedelta(days=1)).strftime("%b %d")
    assert f"<title>{day} · claude: 3k</title>" in html
    assert f"<title>{day} · claude: $2.50</title>" in html
    # Top users by cost, most expensive first, names escaped, each linking to their records.
    top = response.context["top_users"]
    assert [(u["username"], u["cost"]) for u in top] == [("alice", "3.75"), ("eve<b>", "0.75"), ("bob", "0.0002")]
    assert "eve&lt;b&gt;" in html and "eve<b>" not in html
    assert "username=alice" in html


def test_usage_page_period_selects_the_days(staff_client) -> None:
    month = staff_client.get(reverse("admin:usage_dashboard"), {"days": 30})
    assert month.context["totals"]["requests"] == "5" and month.context["totals"]["cost"] == "14.5002"
    assert len(month.context["charts"]) == 3
    fallback = staff_client.get(reverse("admin:usage_dashboard"), {"days": "nonsense"})
    assert fallback.context["period_days"] == 30


def test_admin_index_links_to_the_usage_page(staff_client) -> None:
    html = staff_client.get(reverse("admin:index")).content.decode()
    assert reverse("admin:usage_dashboard") in html and "Usage dashboard" in html


def test_ledger_change_list_filters_and_totals(staff_client, ledger) -> None:
    url = reverse("admin:usage_usagerecord_changelist")
    everything = staff_client.get(url)
    assert everything.status_code == 200
    assert everything.context["totals"] == {
        "requests": 6,
        "input_tokens": 3416,
        "output_tokens": 1816,
        "cost": "113.5002",
    }
    assert 'id="usage-totals"' in everything.content.decode()

    cases = [
        ({"provider": "openai"}, 3, "110.25"),
        ({"model": "claude-sonnet-4"}, 1, "2.5"),
        ({"plan": "free"}, 2, "99.0002"),
        ({"status": "failed"}, 1, "0.0002"),
        ({"username": "alice"}, 3, "13.75"),
        ({"username": "alice", "provider": "openai"}, 2, "11.25"),
        ({"created_at__gte": str(datetime.combine(TODAY - timedelta(days=1), time.min, tzinfo=UTC))}, 2, "3.75"),
        ({"day": (TODAY - timedelta(days=1)).isoformat()}, 1, "2.5"),
        ({"day": (TODAY - timedelta(days=200)).isoformat(), "plan": "free"}, 1, "99"),
        ({"transport": "rest"}, 6, "113.5002"),
        ({"transport": "websocket"}, 0, "0"),
        ({"q": "nobody"}, 0, "0"),
    ]
    for params, requests, cost in cases:
        response = staff_client.get(url, params)
        assert response.status_code == 200, params
        assert (response.context["totals"]["requests"], response.context["totals"]["cost"]) == (requests, cost), params
    one = UsageRecord.objects.filter(user=ledger["bob"], status="failed").get()
    assert staff_client.get(url, {"q": str(one.request_id)}).context["totals"]["requests"] == 1


def test_a_day_that_is_not_a_day_is_refused_not_ignored(staff_client, ledger) -> None:
    """`?day=2024-02-30` showed the whole ledger's totals (6 records, $113.5002) under a day filter."""
    url = reverse("admin:usage_usagerecord_changelist")
    for bad in ("2024-02-30", "yesterday", f"{TODAY.isoformat()}x"):
        response = staff_client.get(url, {"day": bad})
        # The admin's answer to a bad lookup: back to the list, flagged invalid, no figures shown.
        assert response.status_code == 302 and response["Location"].endswith("?e=1"), bad
    assert staff_client.get(url, {"day": ""}).context["totals"]["requests"] == 6  # an empty box filters nothing
    for edge in ("9999-12-31", "0001-01-01"):  # the calendar's ends are days too (the last has no next day)
        response = staff_client.get(url, {"day": edge})
        assert response.status_code == 200 and response.context["totals"]["requests"] == 0, edge


def test_ledger_rows_are_read_only(staff_client, ledger) -> None:
    one = UsageRecord.objects.first()
    assert one is not None
    assert staff_client.get(reverse("admin:usage_usagerecord_add")).status_code == 403
    assert staff_client.get(reverse("admin:usage_usagerecord_delete", args=[one.pk])).status_code == 403
    view = staff_client.get(reverse("admin:usage_usagerecord_change", args=[one.pk]))
    assert view.status_code == 200 and 'name="_save"' not in view.content.decode()
    before = UsageRecord.objects.get(pk=one.pk).cost
    staff_client.post(reverse("admin:usage_usagerecord_change", args=[one.pk]), {"cost": "0"})
    assert UsageRecord.objects.get(pk=one.pk).cost == before


def test_only_staff_reach_the_usage_page(ledger) -> None:
    client = Client()
    anonymous = client.get(reverse("admin:usage_dashboard"))
    assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]
    client.force_login(ledger["alice"])  # not staff
    assert client.get(reverse("admin:usage_dashboard")).status_code == 302
    staff = User.objects.create_user("viewer", password="pw-viewer-123", is_staff=True)  # staff without permission
    client.force_login(staff)
    assert client.get(reverse("admin:usage_dashboard")).status_code == 403


def test_chart_number_formats() -> None:
    assert [compact(v) for v in (0, 12, 1500, 12_345, 4_200_000)] == ["0", "12", "1.5k", "12.3k", "4.2M"]
    values = (0, 0.0002, 0.75, 2.5, 1234.5, 123_456.7)
    assert [dollars(v) for v in values] == ["$0", "$0.0002", "$0.75", "$2.50", "$1,234.50", "$123,457"]
    assert [nice_ceiling(v) for v in (0, 3, 7, 12, 240, 0.03)] == [1.0, 5, 10, 20, 250, pytest.approx(0.05)]
