"""Reads of the ledger: a user's totals for a period, broken down by provider, model and day."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncDate

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
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime.combine(day + timedelta(days=1) if end else day, time.min, tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise ServiceError(
            "invalid_request",
            f"{name} must be an ISO date (YYYY-MM-DD) or date-time.",
            status=400,
            details={"fields": {name: "must be an ISO date or date-time"}},
        ) from None
    return moment.astimezone(UTC)


def period_from_params(params: dict[str, str], *, now: datetime | None = None) -> Period:
    """`from`/`to` (dates are whole UTC days, `to` inclusive) or `period=day|week|month` (ending today)."""
    now = now or datetime.now(UTC)
    today = datetime.combine(now.date(), time.min, tzinfo=UTC)
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


_TOTALS = {
    "requests": Count("id"),
    "input_tokens": Coalesce(Sum("input_tokens"), 0),
    "output_tokens": Coalesce(Sum("output_tokens"), 0),
    "cost": Coalesce(Sum("cost"), Decimal(0)),
}


def _row(values: dict[str, Any]) -> dict[str, Any]:
    values["cost"] = str(Decimal(values["cost"]).normalize() if values["cost"] else Decimal(0))
    return values


def usage_summary(*, user_id: int, period: Period) -> dict[str, Any]:
    """Totals and breakdowns for one user's ledger over `period` (aggregates over an index)."""
    records: QuerySet[UsageRecord] = UsageRecord.objects.filter(
        user_id=user_id, created_at__gte=period.start, created_at__lt=period.end
    )
    totals = _row(records.aggregate(**_TOTALS))
    by_provider = [_row(dict(r)) for r in records.values("provider").annotate(**_TOTALS).order_by("provider")]
    by_model = [_row(dict(r)) for r in records.values("model").annotate(**_TOTALS).order_by("model")]
    by_day = [
        _row({**r, "day": r["day"].isoformat()})
        for r in records.annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values("day")
        .annotate(**_TOTALS)
        .order_by("day")
    ]
    return {
        "period": period.as_dict(),
        **totals,
        "by_provider": by_provider,
        "by_model": by_model,
        "by_day": by_day,
    }
