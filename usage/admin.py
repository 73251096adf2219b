"""Admin for the ledger (read-only, filtered, with totals), the usage page, and the daily token quota rows."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.db.models import Count, QuerySet, Sum
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import URLPattern, path

from accounts.models import Plan
from providers.models import LLMModel, ProviderName
from usage.admin_views import usage_dashboard
from usage.models import DailyTokenUsage, TokenReservation, UsageRecord, UsageStatus
from usage.selectors import money

TRANSPORTS = ("rest", "sse", "websocket", "batch", "openai")

# The admin index links to the usage page (templates/admin/usage/index.html extends the stock index).
admin.site.index_template = "admin/usage/index.html"


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class _ExactFilter(admin.SimpleListFilter):
    """Choices from a small table or enum rather than SELECT DISTINCT over millions of ledger rows."""

    field = ""

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(**{self.field: value}) if value else queryset


class PlanFilter(_ExactFilter):
    title = parameter_name = field = "plan"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(name, name) for name in Plan.objects.values_list("name", flat=True)]


class ProviderFilter(_ExactFilter):
    title = parameter_name = field = "provider"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(ProviderName.choices)


class ModelFilter(_ExactFilter):
    title = parameter_name = field = "model"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(name, name) for name in LLMModel.objects.order_by("provider", "name").values_list("name", flat=True)]


class StatusFilter(_ExactFilter):
    title = parameter_name = field = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(UsageStatus.choices)


class TransportFilter(_ExactFilter):
    title = parameter_name = field = "transport"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(name, name) for name in TRANSPORTS]


class DayFilter(admin.SimpleListFilter):
    """One UTC day (`?day=YYYY-MM-DD`, any date); the last two weeks are listed."""

    title = "day (UTC)"
    parameter_name = "day"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        today = datetime.now(UTC).date()
        return [((today - timedelta(days=n)).isoformat(), f"{today - timedelta(days=n):%a %b %d}") for n in range(14)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        try:
            day = date.fromisoformat(value)
        except ValueError:
            # Not a day: refused as the admin's own filters refuse a bad value (the change list
            # says so), never ignored, which showed the whole ledger's totals under `?day=`.
            raise IncorrectLookupParameters(f"day must be YYYY-MM-DD, not {value!r}") from None
        start = datetime.combine(day, time.min, tzinfo=UTC)
        if day == date.max:  # no next day to end it: the last day runs to the end of time
            return queryset.filter(created_at__gte=start)
        return queryset.filter(created_at__gte=start, created_at__lt=start + timedelta(days=1))


class UserFilter(admin.SimpleListFilter):
    """A username box: a list of every user would not scale."""

    title = "user"
    parameter_name = "username"
    template = "admin/usage/input_filter.html"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("", "")]  # non-empty, so the filter is shown; the template draws an input instead

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(user__username=value.strip()) if value else queryset

    def choices(self, changelist: Any) -> Any:
        others = {k: v for k, v in changelist.get_filters_params().items() if k != self.parameter_name}
        yield {
            "selected": self.value() is None,
            "query_parts": [(k, item) for k, values in others.items() for item in values],
            "value": self.value() or "",
        }


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "request_id",
        "user",
        "plan",
        "provider",
        "model",
        "status",
        "input_tokens",
        "output_tokens",
        "cost",
        "latency_ms",
        "usage_source",
    )
    list_filter = (
        UserFilter,
        PlanFilter,
        ProviderFilter,
        ModelFilter,
        StatusFilter,
        DayFilter,
        ("created_at", admin.DateFieldListFilter),
        "usage_source",
        TransportFilter,
        "flagged",
    )
    # No date_hierarchy: its SELECT DISTINCT over the whole ledger costs ~0.4 s at a million rows.
    search_fields = ("=request_id", "=user__username")
    list_select_related = ("user",)
    show_full_result_count = False  # one COUNT over the filtered rows, not another over the whole ledger
    show_facets = admin.ShowFacets.NEVER

    def get_urls(self) -> list[URLPattern]:
        dashboard = self.admin_site.admin_view(self.dashboard_view)
        return [path("dashboard/", dashboard, name="usage_dashboard"), *super().get_urls()]

    def dashboard_view(self, request: HttpRequest) -> TemplateResponse:
        return usage_dashboard(request, self)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        response = super().changelist_view(request, extra_context)
        try:
            queryset: QuerySet[UsageRecord] = response.context_data["cl"].queryset  # type: ignore[attr-defined]
        except (AttributeError, KeyError):
            return response
        totals = queryset.aggregate(
            requests=Count("*"),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            cost=Sum("cost"),
        )
        totals["cost"] = money(totals["cost"]) if totals["cost"] is not None else "0"
        response.context_data["totals"] = totals  # type: ignore[attr-defined]
        return response


@admin.register(DailyTokenUsage)
class DailyTokenUsageAdmin(ReadOnlyAdmin):
    list_display = ("day", "user", "used", "reserved")
    list_filter = ("day",)
    search_fields = ("user__username",)


@admin.register(TokenReservation)
class TokenReservationAdmin(ReadOnlyAdmin):
    list_display = ("id", "user", "day", "tokens", "created_at", "expires_at")
