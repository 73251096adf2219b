"""Admin for users (with plan and limits), plans, and API keys (created and shown once here)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.models import ApiKey, Plan, User
from accounts.services import api_key_create, api_key_revoke


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    can_delete = False
    fields = ("prefix", "name", "created_at", "last_used_at", "revoked_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: User | None = None) -> bool:
        return False  # keys are issued with the "Create an API key" action, which shows the key once


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    list_display = ("username", "email", "plan", "is_staff", "is_active", "date_joined")
    list_filter = ("plan", "is_staff", "is_active")
    list_select_related = ("plan",)
    fieldsets = (
        *DjangoUserAdmin.fieldsets,  # type: ignore[misc]
        ("Plan and limits", {"fields": ("plan", "requests_per_hour_override", "tokens_per_day_override")}),
    )
    add_fieldsets = (*DjangoUserAdmin.add_fieldsets, ("Plan", {"fields": ("plan",)}))
    inlines = (ApiKeyInline,)
    actions = ("create_api_key",)

    @admin.action(description="Create an API key (shown once)")
    def create_api_key(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        for user in queryset:
            issued = api_key_create(user=user, name="admin")
            self.message_user(
                request,
                f"New API key for {user.username} (copy it now, it is not shown again): {issued.raw_key}",
                level=messages.WARNING,
            )


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "requests_per_hour",
        "effective_requests_per_hour",
        "tokens_per_day",
        "allowed_providers",
        "priority",
    )
    list_editable = ("requests_per_hour", "tokens_per_day", "allowed_providers", "priority")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "user", "name", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("prefix", "user__username", "name")
    readonly_fields = ("user", "prefix", "created_at", "last_used_at", "revoked_at")
    exclude = ("key_hash",)
    actions = ("revoke",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for api_key in queryset:
            api_key_revoke(api_key=api_key)
        self.message_user(request, f"Revoked {queryset.count()} key(s).")
