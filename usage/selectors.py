"""Reads of the ledger: a user's totals for a period, broken down by provider, model and day."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, Sum
from django.db.models.functions import Coalesce, TruncDate

from accounts.models import User
from chatservice.errors import ServiceError
from usage.models import UsageRecord

PERIOD_DAYS = {"day": 1, "week": 7, "month": 30}
MAX_PERIOD_DAYS = 366


@dataclass(frozen=True)
class Period:
    start: datetime  # inclusive
    end: datetime  # exclusive

    def as_dict(self) -> dict[str, str]:
        return {"from": _iso(self.start), "to": _iso(self.end)}


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _parse_moment(value: str, name: str, *, end: bool) -> datetime:
    try:
        if "T" not in value and ":" not in value:  # a date in any ISO form (2026-03-14, 20260314): a whole day
            day = date.fromisoformat(value)
            moment = datetime.combine(day + timedelta(days=1) if end else day, time.min, tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: the day after 9999-12-31, or out of range in UTC
        raise ServiceError(
            "invalid_request",
            f"{name} must be an ISO date (YYYY-MM-DD) or date-time.",
            status=400,
            details={"fields": {name: "must be an ISO date or date-time"}},
        ) from None


def period_from_params(params: dict[str, str], *, now: datetime | None = None) -> Period:
    """`from`/`to` (dates are whole UTC days, `to` inclusive) or `period=day|week|month` (ending today)."""
    now = now or datetime.now(UTC)
    today = datetime.combine(now.date(), time.min, tzinfo=UTC)
    if ("from" in params or "to" in params) and "period" in params:
        raise ServiceError(
            "invalid_request",
            "Give either period or from/to, not both.",
            status=400,
            details={"fields": {"period": "not allowed together with from/to"}},
        )
    if "from" in params or "to" in params:
        start = _parse_moment(params["from"], "from", end=False) if "from" in params else today
        end = _parse_moment(params["to"], "to", end=True) if "to" in params else today + timedelta(days=1)
    else:
        name = params.get("period", "day")
        if name not in PERIOD_DAYS:
            raise ServiceError(
                "invalid_request",
                "period must be one of day, week, month.",
                status=400,
                details={"fields": {"period": "must be day, week or month"}},
            )
        end = today + timedelta(days=1)
        start = end - timedelta(days=PERIOD_DAYS[name])
    if end <= start:
        raise ServiceError(
            "invalid_request",
            "`to` must be after `from`.",
            status=400,
            details={"fields": {"to": "must be after from"}},
        )
    if end - start > timedelta(days=MAX_PERIOD_DAYS):
        raise ServiceError(
            "invalid_request",
            f"A period spans at most {MAX_PERIOD_DAYS} days.",
            status=400,
            details={"fields": {"from": f"at most {MAX_PERIOD_DAYS} days before to"}},
        )
    return Period(start, end)


@dataclass
class _Totals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal = Decimal(0)

    def add(self, requests: int, input_tokens: int, output_tokens: int, cost: Decimal) -> None:
        self.requests += requests
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cost += cost

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost": money(self.cost),
        }


def money(value: Decimal) -> str:
    """A USD amount as an exact decimal string without exponent or trailing zeros ("0.00042", "12")."""
    return format(value.normalize(), "f") if value else "0"


def _breakdown(groups: dict[str, _Totals], key: str) -> list[dict[str, Any]]:
    return [{key: name, **groups[name].as_dict()} for name in sorted(groups)]


def usage_summary(*, user_id: int, period: Period) -> dict[str, Any]:
    """Totals and breakdowns by provider, model and UTC day of one user's ledger over `period`.

    One aggregate query grouped by (provider, model, day) — an index-only scan of the covering
    `usage_user_time_cover` index — folded into the totals and the three breakdowns here: the
    groups are few (models x days) however many records the period holds.
    """
    groups = (
        UsageRecord.objects.filter(user_id=user_id, created_at__gte=period.start, created_at__lt=period.end)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values_list("provider", "model", "day")
        .annotate(
            requests=Count("*"),
            input=Coalesce(Sum("input_tokens"), 0),
            output=Coalesce(Sum("output_tokens"), 0),
            spent=Coalesce(Sum("cost"), Decimal(0)),
        )
        .order_by()
    )
    total = _Totals()
    by_provider: defaultdict[str, _Totals] = defaultdict(_Totals)
    by_model: defaultdict[str, _Totals] = defaultdict(_Totals)
    by_day: defaultdict[str, _Totals] = defaultdict(_Totals)
    for provider, model, day, requests, input_tokens, output_tokens, cost in groups:
        amounts = (int(requests), int(input_tokens), int(output_tokens), Decimal(cost))
        total.add(*amounts)
        by_provider[provider].add(*amounts)
        by_model[model].add(*amounts)
        by_day[day.isoformat()].add(*amounts)
    return {
        "period": period.as_dict(),
        **total.as_dict(),
        "by_provider": _breakdown(by_provider, "provider"),
        "by_model": _breakdown(by_model, "model"),
        "by_day": _breakdown(by_day, "day"),
    }


@dataclass(frozen=True)
class DailyProviderUsage:
    day: date
    provider: str
    requests: int
    tokens: int
    cost: Decimal


def usage_by_day_and_provider(*, start: datetime, end: datetime) -> list[DailyProviderUsage]:
    """Every user's requests, tokens (input + output) and cost per UTC day and provider in [start, end)."""
    rows = (
        UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values_list("day", "provider")
        .annotate(
            requests=Count("*"),
            tokens=Coalesce(Sum("input_tokens"), 0) + Coalesce(Sum("output_tokens"), 0),
            spent=Coalesce(Sum("cost"), Decimal(0)),
        )
        .order_by("day", "provider")
    )
    return [
        DailyProviderUsage(day, provider, int(n), int(tokens), Decimal(cost)) for day, provider, n, tokens, cost in rows
    ]


@dataclass(frozen=True)
class UserSpend:
    user_id: int
    username: str
    requests: int
    tokens: int
    cost: Decimal


def top_users_by_cost(*, start: datetime, end: datetime, limit: int = 10) -> list[UserSpend]:
    """The users who cost the most in [start, end), most expensive first."""
    rows = (
        UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
        .values_list("user_id")
        .annotate(
            requests=Count("*"),
            tokens=Coalesce(Sum("input_tokens"), 0) + Coalesce(Sum("output_tokens"), 0),
            spent=Coalesce(Sum("cost"), Decimal(0)),
        )
        .order_by("-spent", "user_id")[:limit]
    )
    spends = list(rows)
    names = dict(User.objects.filter(pk__in=[r[0] for r in spends]).values_list("pk", "username"))
    return [UserSpend(uid, names.get(uid, str(uid)), int(n), int(t), Decimal(c)) for uid, n, t, c in spends]
