"""Admin for the ledger (read-only) and the daily token quota rows."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Count, QuerySet, Sum
from django.http import HttpRequest

from usage.models import DailyTokenUsage, TokenReservation, UsageRecord


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


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
    list_filter = ("plan", "provider", "model", "status", "usage_source", "transport", "flagged")
    date_hierarchy = "created_at"
    search_fields = ("request_id", "user__username")
    list_select_related = ("user",)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        response = super().changelist_view(request, extra_context)
        try:
            queryset: QuerySet[UsageRecord] = response.context_data["cl"].queryset  # type: ignore[attr-defined]
        except (AttributeError, KeyError):
            return response
        response.context_data["totals"] = queryset.aggregate(  # type: ignore[attr-defined]
            requests=Count("id"),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            cost=Sum("cost"),
        )
        return response


@admin.register(DailyTokenUsage)
class DailyTokenUsageAdmin(ReadOnlyAdmin):
    list_display = ("day", "user", "used", "reserved")
    list_filter = ("day",)
    search_fields = ("user__username",)


@admin.register(TokenReservation)
class TokenReservationAdmin(ReadOnlyAdmin):
    list_display = ("id", "user", "day", "tokens", "created_at", "expires_at")
