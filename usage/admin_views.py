"""The admin usage page: daily requests, tokens and cost by provider, and the top users by cost,
drawn as inline SVG on the server (no script, no CDN)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from providers.catalog import PROVIDERS
from usage.selectors import DailyProviderUsage, money, top_users_by_cost, usage_by_day_and_provider

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

PERIODS = (7, 30, 90)
DEFAULT_DAYS = 30
PROVIDER_COLORS = {"openai": "#10a37f", "claude": "#d97757", "deepseek": "#4d6bfe", "gemini": "#a259d9"}
OTHER_COLOR = "#8a8a8a"

# Chart geometry (SVG user units; the SVG scales to its container).
WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 30, 30


@dataclass(frozen=True)
class Series:
    name: str
    color: str
    values: Sequence[float]


def compact(value: float) -> str:
    """12 → "12", 12_345 → "12.3k", 4_200_000 → "4.2M"."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{value:.0f}" if value == int(value) else f"{value:.2f}"


def dollars(value: float) -> str:
    if value >= 10_000:
        return f"${value:,.0f}"
    if value >= 1:
        return f"${value:,.2f}"
    return f"${value:.4f}".rstrip("0").rstrip(".") if value else "$0"


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^n at or above `value` (the top of a y axis)."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    return next(step * magnitude for step in (1, 2, 2.5, 5, 10) if step * magnitude >= value)


def _legend(series: Sequence[Series]) -> list[str]:
    parts, x = [], LEFT
    for s in series:
        parts.append(f'<rect x="{x}" y="8" width="12" height="12" rx="2" fill="{s.color}"/>')
        parts.append(f'<text x="{x + 16}" y="18" class="legend">{escape(s.name)}</text>')
        x += 28 + 9 * len(s.name)
    return parts


def stacked_bars(title: str, days: Sequence[date], series: Sequence[Series], fmt: Callable[[float], str]) -> SafeString:
    """One bar per day, stacked by series, with a y axis, day labels, a legend and a tooltip per segment."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    totals = [sum(s.values[i] for s in series) for i in range(len(days))]
    top = nice_ceiling(max(totals, default=0))
    slot = plot_w / max(1, len(days))
    bar = max(1.0, slot * 0.78)
    parts = [
        f'<svg class="usage-chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for step in range(5):
        value = top * step / 4
        y = TOP + plot_h - plot_h * step / 4
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">{escape(fmt(value))}</text>')
    label_every = max(1, math.ceil(len(days) / 10))
    for i, day in enumerate(days):
        x = LEFT + i * slot + (slot - bar) / 2
        y = TOP + plot_h
        for s in series:
            if s.values[i] <= 0:
                continue
            h = plot_h * s.values[i] / top
            y -= h
            tip = f"{day:%b %d} · {s.name}: {fmt(s.values[i])}"
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{s.color}">'
                f"<title>{escape(tip)}</title></rect>"
            )
        if i % label_every == 0:
            cx = LEFT + i * slot + slot / 2
            parts.append(f'<text x="{cx:.1f}" y="{HEIGHT - 10}" class="axis" text-anchor="middle">{day:%b %d}</text>')
    parts += _legend(series)
    parts.append("</svg>")
    return mark_safe("".join(parts))  # every interpolated text above is escaped


def horizontal_bars(title: str, rows: Sequence[tuple[str, float, str]], fmt: Callable[[float], str]) -> SafeString:
    """One labeled bar per (label, value, link) row, longest first, the value printed at its end."""
    row_h, label_w, value_w = 26, 150, 80
    height = TOP + row_h * max(1, len(rows)) + 8
    plot_w = WIDTH - label_w - value_w - RIGHT
    top = max((value for _, value, _ in rows), default=0) or 1
    parts = [
        f'<svg class="usage-chart" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    if not rows:
        parts.append(f'<text x="{label_w}" y="{TOP + 16}" class="axis">No usage in this period.</text>')
    for i, (label, value, link) in enumerate(rows):
        y = TOP + i * row_h
        w = max(1.0, plot_w * value / top)
        parts.append(f'<a href="{escape(link)}">')
        parts.append(f'<text x="{label_w - 8}" y="{y + 16}" class="label" text-anchor="end">{escape(label)}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" rx="2" fill="#417690">'
            f"<title>{escape(f'{label}: {fmt(value)}')}</title></rect>"
        )
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 16}" class="axis">{escape(fmt(value))}</text>')
        parts.append("</a>")
    parts.append("</svg>")
    return mark_safe("".join(parts))  # every interpolated text above is escaped


def _days_param(raw: str | None) -> int:
    try:
        days = int(raw) if raw else DEFAULT_DAYS
    except ValueError:
        return DEFAULT_DAYS
    return days if days in PERIODS else DEFAULT_DAYS


def _provider_series(rows: Sequence[DailyProviderUsage], days: Sequence[date], metric: str) -> list[Series]:
    index = {day: i for i, day in enumerate(days)}
    names = [p for p in PROVIDERS if any(r.provider == p for r in rows)]
    names += sorted({r.provider for r in rows} - set(names))
    values = {name: [0.0] * len(days) for name in names}
    for row in rows:
        values[row.provider][index[row.day]] += float(getattr(row, metric))
    return [Series(name or "none", PROVIDER_COLORS.get(name, OTHER_COLOR), values[name]) for name in names]


def usage_dashboard(request: HttpRequest, model_admin: ModelAdmin[Any]) -> TemplateResponse:
    """The admin page: `?days=7|30|90` (UTC days ending today)."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    period_days = _days_param(request.GET.get("days"))
    end = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), time.min, tzinfo=UTC)
    start = end - timedelta(days=period_days)
    days = [start.date() + timedelta(days=n) for n in range(period_days)]
    rows = usage_by_day_and_provider(start=start, end=end)
    top_users = top_users_by_cost(start=start, end=end, limit=10)
    changelist = reverse("admin:usage_usagerecord_changelist")
    since = {"created_at__gte": str(start)}  # the format the date filter itself links with

    by_provider: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = by_provider.setdefault(
            row.provider, {"provider": row.provider or "none", "requests": 0, "tokens": 0, "cost": Decimal(0)}
        )
        entry["requests"] += row.requests
        entry["tokens"] += row.tokens
        entry["cost"] += row.cost
    providers = sorted(by_provider.values(), key=lambda e: e["cost"], reverse=True)
    for entry in providers:
        entry.update(requests=f"{entry['requests']:,}", tokens=f"{entry['tokens']:,}", cost=money(entry["cost"]))
    charts = [
        ("Requests per day", stacked_bars("Requests per day", days, _provider_series(rows, days, "requests"), compact)),
        ("Tokens per day", stacked_bars("Tokens per day", days, _provider_series(rows, days, "tokens"), compact)),
        ("Cost per day (USD)", stacked_bars("Cost per day (USD)", days, _provider_series(rows, days, "cost"), dollars)),
    ]
    top_chart = horizontal_bars(
        "Top users by cost",
        [
            (u.username, float(u.cost), f"{changelist}?{urlencode({'username': u.username, **since})}")
            for u in top_users
        ],
        dollars,
    )
    total_cost = sum((r.cost for r in rows), Decimal(0))
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "Usage",
        "subtitle": f"Last {period_days} days (UTC)",
        "opts": model_admin.model._meta,
        "period_days": period_days,
        "periods": PERIODS,
        "start": start,
        "end": end,
        "totals": {
            "requests": f"{sum(r.requests for r in rows):,}",
            "tokens": f"{sum(r.tokens for r in rows):,}",
            "cost": money(total_cost),
            "cost_rounded": dollars(float(total_cost)),
        },
        "charts": charts,
        "top_chart": top_chart,
        "top_users": [
            {"username": u.username, "requests": f"{u.requests:,}", "tokens": f"{u.tokens:,}", "cost": money(u.cost)}
            for u in top_users
        ],
        "providers": providers,
        "changelist_url": changelist,
    }
    return TemplateResponse(request, "admin/usage/dashboard.html", context)
